/* SentencePiece's BPE encoding: the same ids, two to four times as fast.

The same three steps as SentencePiece:

  1. normalize: a dummy-prefix U+2581 first, each ASCII space -> U+2581, each byte that does not start
     valid UTF-8 -> U+FFFD (one byte consumed), other characters as they are (an "identity" model);
  2. BPE: split into characters, then merge the adjacent pair whose concatenation is a piece with the
     highest score (ties: the leftmost), again and again (a max-heap of candidate pairs);
  3. ids: each final symbol's piece id; a symbol that is not a piece -> its UTF-8 bytes as <0xXX>
     pieces (byte fallback), or one <unk> per run of them without byte fallback.

What costs SentencePiece its time is looking up every neighbouring pair as a string in a hash table
larger than the core's cache. Here symbols are ids (a piece's id, or for a character that only occurs
inside pieces an id of its own, >= pieces), and the pair table holds every split of every piece into two
symbols, so looking up (left id, right id) asks exactly what SentencePiece asks of the concatenated
string, in a table of 8-byte words (2 MiB for ChatGLM2's 64,794 pieces). And before merging, the text is
cut between every two characters that no piece holds side by side: nothing can merge across such a cut,
so each run (1.6 characters on average in Chinese text) is merged on its own with a heap of a few pairs,
and its merges happen in the order they would over the whole text.

fast_bpe.py checks that a model has only what this handles (BPE, identity normalizer, no user-defined
or unused pieces, ...) and compares both encoders on probe texts before using this one.
Built by fast_bpe.py with the system C compiler; no Python headers needed (called through ctypes). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A merge packs into one word, (left + 1) << 42 | (right + 1) << 21 | merged; 0: an empty slot. */
#define ID_BITS 21
#define ID_MASK ((1u << ID_BITS) - 1)

typedef struct {
    int32_t *char_ids; /* codepoint -> symbol id + 1; 0: a character no piece holds */
    uint64_t *merges;
    uint64_t *inner; /* bitset over hashed character pairs: set for each pair that is adjacent inside a piece */
    float *scores; /* per piece id */
    uint64_t mask;
    int32_t pieces, unk_id, byte_fallback, add_dummy_prefix;
    int32_t byte_ids[256];
} Model;

#define CODEPOINTS 0x110000

static uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)(left + 1) << ID_BITS) | (uint32_t)(right + 1);
}

static uint64_t slot_of(uint64_t key, uint64_t mask) { return (key * 0x9E3779B97F4A7C15ull) >> 23 & mask; }

#define INNER_BITS 18 /* 32 KiB: stays in the first-level cache; a false positive only joins two runs */

static uint64_t inner_bit(int32_t left, int32_t right) {
    return (pair_key(left, right) * 0x9E3779B97F4A7C15ull) >> (64 - INNER_BITS);
}

/* Whether characters left, right (symbol ids) may end up in one piece; when not, nothing merges across them. */
static int inner(const Model *m, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return 0;
    uint64_t bit = inner_bit(left, right);
    return (int)(m->inner[bit >> 6] >> (bit & 63) & 1);
}

/* The piece that left and right make, or -1. */
static int32_t find_merge(const Model *m, int32_t left, int32_t right) {
    uint64_t key = pair_key(left, right);
    for (uint64_t i = slot_of(key, m->mask);; i = (i + 1) & m->mask) {
        uint64_t e = m->merges[i];
        if (e >> ID_BITS == key) return (int32_t)(e & ID_MASK);
        if (e == 0) return -1;
    }
}

void fbpe_free(void *model) {
    Model *m = model;
    if (!m) return;
    free(m->char_ids), free(m->merges), free(m->inner), free(m->scores), free(m);
}

/* chars: codepoints[i] has symbol id char_ids[i]; merges: (lefts[i], rights[i]) -> merged[i]; scores:
   per piece id (pieces of them); ids >= pieces are characters that are not pieces (all ids < 2^21 - 1);
   pairs: (pair_lefts[i], pair_rights[i]) are characters adjacent inside some piece; byte_ids NULL: no
   byte fallback. */
void *fbpe_new(int32_t chars, const int32_t *codepoints, const int32_t *char_ids, int32_t merges,
               const int32_t *lefts, const int32_t *rights, const int32_t *merged, const float *scores, int32_t pieces,
               int32_t pairs, const int32_t *pair_lefts, const int32_t *pair_rights, int32_t unk_id,
               const int32_t *byte_ids, int32_t add_dummy_prefix) {
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    uint64_t size = 1024;
    while (size < 2u * (uint64_t)merges) size <<= 1;
    m->char_ids = calloc(CODEPOINTS, sizeof(int32_t));
    m->merges = calloc(size, sizeof(uint64_t));
    m->inner = calloc((1u << INNER_BITS) / 64, sizeof(uint64_t));
    m->scores = malloc(sizeof(float) * (size_t)(pieces ? pieces : 1));
    if (!m->char_ids || !m->merges || !m->inner || !m->scores) {
        fbpe_free(m);
        return NULL;
    }
    memcpy(m->scores, scores, sizeof(float) * (size_t)pieces);
    m->mask = size - 1;
    for (int32_t k = 0; k < chars; k++)
        if (codepoints[k] >= 0 && codepoints[k] < CODEPOINTS) m->char_ids[codepoints[k]] = char_ids[k] + 1;
    for (int32_t k = 0; k < merges; k++) {
        uint64_t key = pair_key(lefts[k], rights[k]), i = slot_of(key, m->mask);
        while (m->merges[i] != 0 && m->merges[i] >> ID_BITS != key) i = (i + 1) & m->mask;
        m->merges[i] = key << ID_BITS | (uint32_t)merged[k];
    }
    for (int32_t k = 0; k < pairs; k++) {
        uint64_t bit = inner_bit(pair_lefts[k], pair_rights[k]);
        m->inner[bit >> 6] |= 1ull << (bit & 63);
    }
    m->pieces = pieces;
    m->unk_id = unk_id;
    m->byte_fallback = byte_ids != NULL;
    if (byte_ids) memcpy(m->byte_ids, byte_ids, sizeof(m->byte_ids));
    m->add_dummy_prefix = add_dummy_prefix;
    return m;
}

/* SentencePiece's DecodeUTF8 rule: the valid character at s (its length in *len), or -1 (*len = 1). */
static int32_t decode_char(const uint8_t *s, int64_t left, int32_t *len) {
    uint32_t c;
    *len = 1;
    if (s[0] < 0x80) return s[0];
    if (left >= 2 && (s[0] & 0xE0) == 0xC0) {
        c = ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && c >= 0x80) return *len = 2, (int32_t)c;
    } else if (left >= 3 && (s[0] & 0xF0) == 0xE0) {
        c = ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && c >= 0x800 && (c < 0xD800 || c >= 0xE000))
            return *len = 3, (int32_t)c;
    } else if (left >= 4 && (s[0] & 0xF8) == 0xF0) {
        c = ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80 && c >= 0x10000 && c <= 0x10FFFF)
            return *len = 4, (int32_t)c;
    }
    return -1;
}

typedef struct {
    int32_t start, len, prev, next, id; /* id -1: a character no piece holds */
} Symbol;

typedef struct {
    float score;
    int32_t left, right, len, id;
} Pair;

typedef struct {
    char *text;
    Symbol *symbols;
    Pair *heap;
    int64_t text_cap, symbols_cap, heap_cap, heap_n;
} Work;

static int reserve(void **buffer, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 1;
    int64_t size = *cap ? *cap : 1024;
    while (size < need) size *= 2;
    void *grown = realloc(*buffer, (size_t)size * item);
    if (!grown) return 0;
    *buffer = grown, *cap = size;
    return 1;
}

static int better(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static int push(Work *w, Pair pair) {
    if (!reserve((void **)&w->heap, &w->heap_cap, w->heap_n + 1, sizeof(Pair))) return 0;
    int64_t i = w->heap_n++;
    while (i > 0) {
        int64_t up = (i - 1) / 2;
        if (!better(&pair, &w->heap[up])) break;
        w->heap[i] = w->heap[up];
        i = up;
    }
    w->heap[i] = pair;
    return 1;
}

static Pair pop(Work *w) {
    Pair top = w->heap[0], last = w->heap[--w->heap_n];
    int64_t i = 0, n = w->heap_n;
    for (;;) {
        int64_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && better(&w->heap[child + 1], &w->heap[child])) child++;
        if (!better(&w->heap[child], &last)) break;
        w->heap[i] = w->heap[child];
        i = child;
    }
    if (n) w->heap[i] = last;
    return top;
}

static int maybe_push(const Model *m, Work *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return 1;
    const Symbol *l = &w->symbols[left], *r = &w->symbols[right];
    if (l->id < 0 || r->id < 0) return 1;
    int32_t id = find_merge(m, l->id, r->id);
    if (id < 0) return 1;
    return push(w, (Pair){m->scores[id], left, right, l->len + r->len, id});
}

/* BPE over symbols start..end-1: merge the best pair (highest score, then leftmost) until none is a piece. */
static int merge_run(const Model *m, Work *w, int32_t start, int32_t end) {
    w->heap_n = 0;
    for (int32_t i = start + 1; i < end; i++)
        if (!maybe_push(m, w, i - 1, i)) return 0;
    while (w->heap_n) {
        Pair top = pop(w);
        Symbol *l = &w->symbols[top.left], *r = &w->symbols[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.len) continue; /* stale */
        l->len += r->len;
        l->id = top.id;
        l->next = r->next;
        if (r->next >= 0) w->symbols[r->next].prev = top.left;
        r->len = 0;
        if (!maybe_push(m, w, l->prev, top.left) || !maybe_push(m, w, top.left, l->next)) return 0;
    }
    return 1;
}

static int32_t add_char(const Model *m, Work *w, int64_t *len, int32_t count, const char *bytes, int32_t size,
                        int32_t codepoint) {
    memcpy(w->text + *len, bytes, (size_t)size);
    w->symbols[count] = (Symbol){(int32_t)*len, size, count - 1, count + 1, m->char_ids[codepoint] - 1};
    *len += size;
    return count + 1;
}

#define MAX_TEXT_BYTES ((INT32_MAX - 3) / 3) /* positions in the normalized text are 32-bit */

#define NO_MEMORY -1
#define OUT_FULL -2

/* The ids of one text into out (room for room ids); returns their count, NO_MEMORY (out of memory, or
   a text longer than MAX_TEXT_BYTES) or OUT_FULL. */
static int64_t encode_one(const Model *m, Work *w, const uint8_t *in, int64_t n, int32_t *out, int64_t room) {
    if (n == 0) return 0;
    if (n > MAX_TEXT_BYTES) return NO_MEMORY;
    if (!reserve((void **)&w->text, &w->text_cap, 3 * n + 3, 1) ||
        !reserve((void **)&w->symbols, &w->symbols_cap, n + 1, sizeof(Symbol)))
        return NO_MEMORY;
    int64_t len = 0;
    int32_t count = 0;
    if (m->add_dummy_prefix) count = add_char(m, w, &len, count, "\xe2\x96\x81", 3, 0x2581);
    for (int64_t i = 0; i < n;) {
        int32_t size, c = decode_char(in + i, n - i, &size);
        if (c < 0)
            count = add_char(m, w, &len, count, "\xef\xbf\xbd", 3, 0xFFFD);
        else if (c == ' ')
            count = add_char(m, w, &len, count, "\xe2\x96\x81", 3, 0x2581);
        else
            count = add_char(m, w, &len, count, (const char *)in + i, size, c);
        i += size;
    }
    /* Runs of characters that no piece spans are merged one run at a time: each run's merges happen in
       the order they would over the whole text, and the heap stays a few pairs long. */
    for (int32_t start = 0, end; start < count; start = end) {
        for (end = start + 1; end < count && inner(m, w->symbols[end - 1].id, w->symbols[end].id); end++) {
        }
        w->symbols[start].prev = -1;
        w->symbols[end - 1].next = -1;
        if (end - start > 1 && !merge_run(m, w, start, end)) return NO_MEMORY;
    }
    int64_t written = 0;
    int previous_unknown = 0;
    for (int32_t i = 0; i < count; i++) {
        const Symbol *s = &w->symbols[i];
        if (s->len == 0) continue; /* merged into the symbol before it */
        int piece = s->id >= 0 && s->id < m->pieces;
        if (written + (piece || !m->byte_fallback ? 1 : s->len) > room) return OUT_FULL;
        if (piece) {
            out[written++] = s->id;
            previous_unknown = 0;
        } else if (m->byte_fallback) {
            for (int32_t b = 0; b < s->len; b++) out[written++] = m->byte_ids[(uint8_t)w->text[s->start + b]];
        } else {
            if (!previous_unknown) out[written++] = m->unk_id;
            previous_unknown = 1;
        }
    }
    return written;
}

/* Texts data[offsets[i]:offsets[i+1]] for i < count: their ids back to back into out (room for room ids;
   3 * bytes + 3 * count always suffice: a normalized text is at most three times as long, plus the
   prefix) and each one's id count into lengths. Returns the ids written, NO_MEMORY or OUT_FULL. */
int64_t fbpe_encode(const void *model, const char *data, const int64_t *offsets, int64_t count, int32_t *out,
                    int64_t room, int64_t *lengths) {
    const Model *m = model;
    Work w = {0};
    int64_t total = 0;
    for (int64_t k = 0; k < count; k++) {
        int64_t got = encode_one(m, &w, (const uint8_t *)data + offsets[k], offsets[k + 1] - offsets[k], out + total,
                                 room - total);
        if (got < 0) {
            total = got;
            break;
        }
        lengths[k] = got;
        total += got;
    }
    free(w.text), free(w.symbols), free(w.heap);
    return total;
}
