"""SFT data: the chat template (the only copy: chat.py uses it too) and prompt-masked labels.

Template, for every turn of a conversation (earlier turns first, from the CSV's `history`):

    prompt <bos> answer <eos>

Labels, shown on one turn with prompt "头痛" = [p1, p2] and answer "多休息" = [a1, a2]:

    ids     p1    p2    <bos>  a1    a2    <eos>
    X       p1    p2    <bos>  a1    a2             inputs:  ids[:-1]
    Y       p2    <bos> a1     a2    <eos>          targets: ids[1:]
    labels  -100  -100  a1     a2    <eos>          Y where the TARGET is an answer token or its <eos>

so the loss has exactly len(answer) + 1 terms: predicting every answer token (the first from <bos>)
and the closing <eos>. Prompt tokens, the <bos> itself and padding are -100: they are neither in the
sum nor in the denominator (the trainer divides by the number of non-ignored targets).

Every turn's answer is trained on, the earlier ones included (they are real answers to real
prompts). A conversation longer than max_seq_len + 1 tokens loses its earliest turns first, then
the start of the last prompt; answers are never cut, and a last answer that cannot fit whole
(with its <eos> and at least one prompt token) drops the sample, counted.

A CSV row is used only when it is exactly one conversation: `prompt` and `answer` non-empty text,
`history` empty or a JSON list of [prompt, answer] pairs of non-empty strings. Any other row (a turn
of 1 or 3 items, a history of `5`, a short or long row, an unterminated quote, bad bytes) is skipped
and counted with its file:line, so no row can lend its text to another conversation.
"""

import hashlib
import itertools
import json
from collections import Counter, defaultdict

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError
from corpora import BadRecord, Problems, iter_csv, json_loads
from dataset import global_rows
from lm_head import IGNORE_INDEX


def render(turns, bos_id, eos_id):
    """The chat template. turns: [(prompt_ids, answer_ids)], the last answer may be None (chat:
    the model continues after <bos>). Returns (ids, is_answer) as lists."""
    ids, is_answer = [], []
    for prompt, answer in turns:
        ids += list(prompt) + [bos_id]
        is_answer += [False] * (len(prompt) + 1)
        if answer is not None:
            ids += list(answer) + [eos_id]
            is_answer += [True] * (len(answer) + 1)
    return ids, is_answer


def fit_turns(turns, budget):
    """Drop the earliest turns, then the start of the last prompt, until the rendered conversation
    has at most `budget` ids. None when the last answer can't fit whole with one prompt token."""

    def size(ts):
        return sum(len(p) + 1 + (len(a) + 1 if a is not None else 0) for p, a in ts)

    turns = list(turns)
    while len(turns) > 1 and size(turns) > budget:
        turns.pop(0)
    excess = size(turns) - budget
    if excess > 0:
        prompt, answer = turns[-1]
        if len(prompt) - excess < 1:
            return None
        turns[-1] = (prompt[excess:], answer)
    return turns


def labels_for(ids, is_answer):
    """(X, Y) lists for one row: Y keeps the targets that are answer tokens, -100 elsewhere."""
    x = ids[:-1]
    y = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], is_answer[1:])]
    return x, y


def padded_batch(pairs, seq_len, pad_id):
    """(ids, labels) pairs (lists or arrays) -> (X, Y) long tensors, padded with pad_id / IGNORE_INDEX to the
    longest pair rounded up to 32 (fewer distinct shapes for the allocator), at most seq_len."""
    width = min(seq_len, -(-max(len(x) for x, _ in pairs) // 32) * 32)
    X = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    Y = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (x, y) in enumerate(pairs):
        X[r, : len(x)] = torch.as_tensor(x)
        Y[r, : len(y)] = torch.as_tensor(y)
    return X, Y


def encode_turns(tokenizer, conversations, encode_prompts=None):
    """Conversations of text turns [(prompt, answer or None), ...] -> the same of id lists. Prompts and
    answers are encoded in one batch each, and every turn keeps the index of its own texts, so nothing can
    slide from one turn or conversation into the next; a turn that is not a (prompt, answer) pair raises.
    encode_prompts: list of texts -> list of id lists for the prompts (default tokenizer.encode_batch; a
    vision-language model's turns each "<image>" into its image tokens)."""
    prompts, answers, layout = [], [], []
    for turns in conversations:
        slots = []
        for prompt, answer in turns:
            slots.append((len(prompts), None if answer is None else len(answers)))
            prompts.append(prompt)
            if answer is not None:
                answers.append(answer)
        layout.append(slots)
    prompt_ids = (encode_prompts or tokenizer.encode_batch)(prompts) if prompts else []
    answer_ids = tokenizer.encode_batch(answers) if answers else []
    return [[(prompt_ids[p], None if a is None else answer_ids[a]) for p, a in slots] for slots in layout]


def conversation_turns(row) -> list[tuple[str, str]]:
    """The turns of one CSV row (history, then prompt -> answer); BadRecord for anything else."""
    try:
        history = json_loads(row.get("history") or "[]")
    except json.JSONDecodeError as err:
        raise BadRecord("history is not JSON", str(err)) from None
    if not isinstance(history, list):
        raise BadRecord("history is not a list of [prompt, answer] turns", repr(history)[:60])
    turns = history + [[row["prompt"], row["answer"]]]
    for turn in turns:
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) for text in turn)):
            raise BadRecord("a turn is not [prompt, answer] of two strings", repr(turn)[:60])
        if not all(text.strip() for text in turn):
            raise BadRecord("a turn has an empty prompt or answer", repr(turn)[:60])
    return [tuple(turn) for turn in turns]


def read_sft_csv(path, problems: Problems):
    """(source, turns as text pairs) for every good row of sft_data_process.py's CSV; bad rows are
    counted in `problems` with file:line. A file without prompt and answer columns is refused."""
    for line, row in iter_csv(path, problems):
        missing = {"prompt", "answer"} - row.keys()  # history and source are optional
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (header: {list(row)})")
        try:
            yield row.get("source") or "sft", conversation_turns(row)
        except BadRecord as err:
            problems.add(err.reason, path, line, err.detail)


def rows_sha256(*parts) -> str:
    """sha256 over arrays, numbers, strings, bytes and (nested) lists of them: what a data class's rows hold."""
    digest, pending = hashlib.sha256(), list(reversed(parts))
    while pending:
        part = pending.pop()
        if isinstance(part, (list, tuple)):
            digest.update(f"[{len(part)}".encode())
            pending += reversed(part)
        elif isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode() + np.ascontiguousarray(part).tobytes())
        else:
            digest.update(part if isinstance(part, bytes) else f"{type(part).__name__}:{part}".encode())
    return digest.hexdigest()


class RowBatches:
    """Deterministic batches over global rows, for data that gives row(g) (what global row g holds, counting
    across epochs), val_row(i) (the row of held-out item i), to_batch(rows), val_ids, sources and `fingerprint`
    (rows_sha256 of everything the rows and their order depend on). Step s of any (world, grad_accum) split
    gets the same global rows, so resuming needs only the same rows: the checkpoint keeps the fingerprint and
    load_state_dict refuses other data, which would go on with the run's schedule on different batches."""

    fingerprint = None

    def train_batches(self, step, micro_steps, batch_size, rank=0, world=1):
        base = step * micro_steps * world * batch_size
        batches = []
        for m in range(micro_steps):
            rows = global_rows(m, rank, world, batch_size)
            batches.append(self.to_batch([self.row(base + g) for g in range(rows.start, rows.stop)]))
        return batches

    def val_batches(self, batch_size, max_windows=64, rank=0, world=1):
        """{source: [(X, Y), ...]}: held-out items per source, each rank every world-th."""
        by_source = defaultdict(list)
        for i in self.val_ids:
            by_source[str(self.sources[i])].append(int(i))
        out = {}
        for source, ids in sorted(by_source.items()):
            ids = ids[:max_windows][rank::world]
            out[source] = [
                self.to_batch([self.val_row(i) for i in ids[k : k + batch_size]])
                for k in range(0, len(ids), batch_size)
            ]
        return out

    def state_dict(self):
        return {"rows_sha256": self.fingerprint}

    def load_state_dict(self, state, path):
        """Check that `path`'s run trained on these rows (a checkpoint without a fingerprint is not checked)."""
        trained_on = (state or {}).get("rows_sha256")
        if trained_on not in (None, self.fingerprint):
            raise CheckpointError(
                f"{path} was trained on other data (rows sha256 {trained_on[:12]}…, now {self.fingerprint[:12]}…): "
                "resuming would go on with its schedule on different batches. Give the data, seed, val_fraction "
                "and pack it started with, or start a new run (--overwrite=True)"
            )


class SFTData(RowBatches):
    """Tokenized conversations held as one uint16 array (+ answer mask and offsets), split into
    train and validation, served as deterministic batches: step s of any (world, grad_accum) split
    gets the same global rows. pack=True fills each row with several whole conversations (their
    attention is not separated: earlier ones are extra context; the loss still covers only answers)."""

    def __init__(self, csv_path, tokenizer, seq_len, seed=1337, val_fraction=0.02, pack=False, encode_batch=2048):
        self.seq_len, self.seed, self.pack = seq_len, seed, pack
        self.pad_id = tokenizer.pad_id
        self.dropped = Counter()
        self.problems = Problems()  # rows of the CSV that are not one conversation
        tokens, masks, sources = [], [], []
        rows = read_sft_csv(csv_path, self.problems)  # streamed: only the token arrays are kept
        bar = tqdm(desc="tokenize SFT", unit=" conv", leave=False)
        while chunk := list(itertools.islice(rows, encode_batch)):
            bar.update(len(chunk))
            encoded = encode_turns(tokenizer, [turns for _, turns in chunk])
            for (source, _), ids_turns in zip(chunk, encoded, strict=True):
                fitted = fit_turns(ids_turns, seq_len + 1)
                if fitted is None:
                    self.dropped["answer longer than max_seq_len"] += 1
                    continue
                ids, is_answer = render(fitted, tokenizer.bos_id, tokenizer.eos_id)
                tokens.append(np.asarray(ids, dtype=np.uint16))
                masks.append(np.asarray(is_answer, dtype=bool))
                sources.append(source)
        bar.close()
        if not tokens:
            raise ValueError(
                f"{csv_path}: no usable conversation (too long for max_seq_len={seq_len}: "
                f"{dict(self.dropped) or 'none'}; bad rows: {dict(self.problems.counts) or 'none'}, "
                f"first: {'; '.join(self.problems.examples) or '-'})"
            )
        self.store(tokens, masks, sources, val_fraction)

    def store(self, tokens, masks, sources, val_fraction):
        """Keep the rendered conversations (lists of id and answer-mask arrays) and split train / validation."""
        lengths = [len(t) for t in tokens]
        self.tokens, self.masks = np.concatenate(tokens), np.concatenate(masks)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.sources = np.array(sources)
        order = np.random.default_rng(self.seed).permutation(len(lengths))
        n_val = int(round(len(order) * val_fraction)) if len(order) > 1 else 0
        self.val_ids, self.train_ids = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.epoch_rows = []  # row plans of the epochs built so far, see epoch()
        self.fingerprint = rows_sha256(self.tokens, self.masks, self.offsets, self.train_ids, self.seed, self.pack)

    def __len__(self):
        return len(self.train_ids)

    def describe(self):
        drops = f", dropped {dict(self.dropped)}" if self.dropped else ""
        bad = (
            (
                f", {self.problems.total:,} bad CSV row(s) skipped: {dict(self.problems.counts)} "
                f"(first: {'; '.join(self.problems.examples)})"
            )
            if self.problems.counts
            else ""
        )
        return (
            f"{len(self.train_ids)} train / {len(self.val_ids)} val conversations, "
            f"{len(self.tokens):,} tokens{', packed' if self.pack else ''}{drops}{bad}"
        )

    def sample(self, i):
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.masks[lo:hi]

    def epoch(self, e):
        """Row plan of epoch e: a list of rows, each a list of sample ids; built once."""
        while len(self.epoch_rows) <= e:
            self.epoch_rows.append(self._plan(len(self.epoch_rows)))
        return self.epoch_rows[e]

    def _plan(self, epoch):
        order = self.train_ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.train_ids))]
        if not self.pack:
            return [[int(i)] for i in order]
        rows, current, used = [], [], 0
        for i in order:
            n = int(self.offsets[i + 1] - self.offsets[i])
            if current and used + n > self.seq_len + 1:
                rows.append(current)
                current, used = [], 0
            current.append(int(i))
            used += n
        return rows + [current]

    def row(self, g):
        """Sample ids of global row g, counting rows across epochs."""
        e = 0
        while g >= len(self.epoch(e)):
            g -= len(self.epoch(e))
            e += 1
        return self.epoch(e)[g]

    def to_batch(self, rows):
        """Rows of sample ids -> (X, Y), padded to the longest row (rounded up to 32)."""
        pairs = []
        for samples in rows:
            ids = np.concatenate([self.sample(i)[0] for i in samples]).astype(np.int64)
            mask = np.concatenate([self.sample(i)[1] for i in samples])
            pairs.append(labels_for(ids.tolist(), mask.tolist()))
        return padded_batch(pairs, self.seq_len, self.pad_id)

    def val_row(self, i):
        return [i]  # one held-out conversation a row, never packed
