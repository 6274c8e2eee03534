"""fast_bpe.c gives SentencePiece's ids: on the sample and on random and adversarial text, for every kind
of model it takes; a model it does not handle, a missing compiler or tables that disagree leave
SentencePiece encoding."""

import copy
import io
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from chatglm_tokenizer import fast_bpe, load_encoder

from conftest import EXTRA_TEXT, SAMPLE, needs_compiler

SAMPLE_TEXT = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.rglob("*.txt"))]
RANGES = [  # characters drawn for random texts: ASCII and controls, Latin, combining marks, CJK, emoji ...
    (0x20, 0x7F),
    (0x00, 0x20),
    (0x80, 0x250),
    (0x300, 0x370),
    (0x4E00, 0x9FFF),
    (0x3000, 0x3040),
    (0xFF00, 0xFFF0),
    (0x1F300, 0x1FB00),
    (0x20000, 0x2A6E0),
    (0xE000, 0xE100),
    (0x2000, 0x2070),
    (0x2580, 0x2590),
    (0xFFF0, 0x10000),
]

# Byte strings SentencePiece reads as U+FFFD one byte at a time: a UTF-8 surrogate, overlong forms, a
# codepoint past U+10FFFF, a cut character, stray continuation bytes
INVALID_UTF8 = [b"\xed\xa0\x80", b"a\xc0\xafb", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", "高".encode()[:2], b"x\x80\xbf y"]


def train_model(folder, **options):
    """A small SentencePiece model on the sample's text; options as SentencePieceTrainer takes them."""
    settings = {
        "model_type": "bpe",
        "vocab_size": 2000,
        "hard_vocab_limit": False,
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "minloglevel": 2,
    }
    settings.update(options)
    lines = [line for text in SAMPLE_TEXT + [EXTRA_TEXT] * 20 for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **settings)
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def random_texts(encoder, count=1500, seed=0):
    """Runs of the model's own pieces cut anywhere, random characters, random bytes (invalid UTF-8 too),
    pieces around a stray byte, pieces padded with spaces."""
    rng = random.Random(seed)
    sp = encoder.sp
    pieces = [
        sp.id_to_piece(i).replace("\u2581", " ")
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    ]
    texts = []
    for _ in range(count):
        run = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        start = rng.randrange(len(run) + 1)
        texts.append(run[start : start + rng.randrange(1, 200)])
    for _ in range(count):
        texts.append("".join(chr(rng.randrange(*rng.choice(RANGES))) for _ in range(rng.randrange(300))))
    texts += [bytes(rng.randrange(256) for _ in range(rng.randrange(60))) for _ in range(count // 3)]
    texts += [(rng.choice(pieces) + " ").encode() + bytes([rng.randrange(0x80, 0x100)]) for _ in range(count // 3)]
    texts += [" " * rng.randrange(5) + rng.choice(pieces) + " " * rng.randrange(5) for _ in range(count // 3)]
    return texts + INVALID_UTF8


def assert_same_ids(encoder, texts):
    assert encoder.fast is not None, encoder.fast_unavailable
    ids, lengths = encoder.fast.encode(texts)
    got = np.split(ids, np.cumsum(lengths)[:-1])
    expected = encoder.sp.encode(list(texts), out_type=int)
    differ = [
        (text[:60], want[:10], have[:10].tolist())
        for text, want, have in zip(texts, expected, got)
        if want != have.tolist()
    ]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[:3]}"


@needs_compiler
def test_chatglm2_ids_are_sentencepiece_ids(chatglm_tokenizer):
    encoder = load_encoder(chatglm_tokenizer.vocab_file)
    lines = [line for text in SAMPLE_TEXT for line in text.split("\n")]
    assert_same_ids(encoder, SAMPLE_TEXT + lines + random_texts(encoder))


@needs_compiler
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"byte_fallback": False},  # characters it does not know: one <unk> per run, as SentencePiece writes
        {"add_dummy_prefix": False},
        {"split_digits": True, "allow_whitespace_only_pieces": True},
        {"vocab_size": 1100, "character_coverage": 0.98},  # rarer characters left to byte fallback
    ],
    ids=["train_tokenizer", "no-byte-fallback", "no-dummy-prefix", "digits-and-space-pieces", "small-vocab"],
)
def test_models_it_takes_give_sentencepiece_ids(tmp_path, options):
    encoder = load_encoder(train_model(tmp_path, **options))
    assert_same_ids(encoder, SAMPLE_TEXT + random_texts(encoder, count=600, seed=len(options)))


@needs_compiler
def test_the_project_tokenizer_gets_the_fast_encoder(tiny_tokenizer):
    assert tiny_tokenizer.fast is not None, tiny_tokenizer.fast_unavailable
    assert_same_ids(tiny_tokenizer, SAMPLE_TEXT + random_texts(tiny_tokenizer, count=600, seed=7))


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"model_type": "unigram"}, "not a BPE model"),
        ({"normalization_rule_name": "nmt_nfkc"}, "a normalization rule"),
        ({"remove_extra_whitespaces": True}, "whitespace handling"),
        ({"user_defined_symbols": ["高血压"]}, "user-defined"),
    ],
)
def test_models_it_does_not_handle_are_encoded_by_sentencepiece(tmp_path, options, reason):
    encoder = load_encoder(train_model(tmp_path, **options))
    assert encoder.fast is None and reason in encoder.fast_unavailable
    texts = SAMPLE_TEXT[:3] + ["  高血压 患者  "]
    assert encoder.encode_batch(texts) == encoder.sp.encode(texts, out_type=int)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty build folder and no library loaded yet, as on a fresh clone."""
    monkeypatch.setattr(fast_bpe, "BUILD", tmp_path / "build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there either
    monkeypatch.setattr(fast_bpe, "_library", None)
    return tmp_path / "build"


def test_without_a_compiler_sentencepiece_encodes(tiny_tokenizer_dir, fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    encoder = load_encoder(tiny_tokenizer_dir)
    assert encoder.fast is None and "no C compiler (no-such-compiler)" in encoder.fast_unavailable
    assert encoder.encode_batch(SAMPLE_TEXT) == encoder.sp.encode(SAMPLE_TEXT, out_type=int)


@needs_compiler
def test_a_fresh_clone_builds_the_library_and_tables_once(tiny_tokenizer_dir, fresh_build):
    (fresh_build / "older").mkdir(parents=True)  # what an earlier version of fast_bpe left, and a file of the user's
    for name in ("fast_bpe-0123456789abcdef.so", "tables-0123456789ab-0123456789abcdef.npz", "notes.txt"):
        (fresh_build / name).write_bytes(b"old")
    assert load_encoder(tiny_tokenizer_dir).fast is not None
    built = sorted(path.name for path in fresh_build.iterdir())
    assert [name.split("-")[0] for name in built] == ["fast_bpe", "notes.txt", "older", "tables"]
    assert "0123456789ab" not in " ".join(built) and not any(name.endswith(".tmp") for name in built)
    assert load_encoder(tiny_tokenizer_dir).fast is not None
    assert sorted(path.name for path in fresh_build.iterdir()) == built


@needs_compiler
def test_a_checkout_that_cannot_be_written_builds_in_the_users_cache(tiny_tokenizer_dir, fresh_build, monkeypatch):
    blocked = fresh_build.parent / "a_file"
    blocked.write_text("")
    monkeypatch.setattr(fast_bpe, "BUILD", blocked / "build")  # cannot be made, as in a read-only image
    encoder = load_encoder(tiny_tokenizer_dir)
    cache = fresh_build.parent / "cache" / "mini-chinese-gpt" / "fast_bpe"
    assert encoder.fast is not None and sorted(path.name.split("-")[0] for path in cache.iterdir()) == [
        "fast_bpe",
        "tables",
    ]
    assert_same_ids(encoder, SAMPLE_TEXT)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "cache"))  # neither can be written: SentencePiece, and why
    monkeypatch.setattr(fast_bpe, "_library", None)
    encoder = load_encoder(tiny_tokenizer_dir)
    assert encoder.fast is None and "no folder to build in" in encoder.fast_unavailable
    assert encoder.encode_batch(SAMPLE_TEXT) == encoder.sp.encode(SAMPLE_TEXT, out_type=int)


@needs_compiler
def test_tables_that_disagree_with_sentencepiece_are_not_used(tiny_tokenizer_dir, fresh_build, monkeypatch):
    build_tables = fast_bpe.build_tables

    def reversed_scores(*model):
        tables = build_tables(*model)
        tables["scores"] = -tables["scores"]  # merges in the wrong order
        return tables

    monkeypatch.setattr(fast_bpe, "build_tables", reversed_scores)
    encoder = load_encoder(tiny_tokenizer_dir)
    assert encoder.fast is None and "differ from SentencePiece's" in encoder.fast_unavailable


@needs_compiler
def test_a_damaged_table_cache_is_built_again(tiny_tokenizer_dir, fresh_build):
    load_encoder(tiny_tokenizer_dir)
    (cache,) = fresh_build.glob("tables-*.npz")
    cache.write_bytes(b"not a zip file")
    encoder = load_encoder(tiny_tokenizer_dir)
    assert encoder.fast is not None
    assert_same_ids(encoder, SAMPLE_TEXT)


@needs_compiler
@pytest.mark.parametrize("num_threads", [1, 2, -1])
def test_batch_methods_on_threads_give_the_same_ids(tiny_tokenizer, num_threads, monkeypatch):
    monkeypatch.setattr(fast_bpe, "PARALLEL_BYTES", 1)  # even a small batch is split over the threads
    texts = SAMPLE_TEXT * 3
    expected = tiny_tokenizer.sp.encode(texts, out_type=int)
    assert tiny_tokenizer.encode_batch(texts, num_threads=num_threads) == expected
    arrays = tiny_tokenizer.encode_arrays([text.encode() for text in texts], num_threads=num_threads)
    assert [array.tolist() for array in arrays] == expected and all(a.dtype == np.int32 for a in arrays)


@needs_compiler
def test_a_text_too_long_for_fast_bpe_goes_to_sentencepiece(tiny_tokenizer, monkeypatch):
    texts = [text.encode() for text in SAMPLE_TEXT]
    calls = []

    class Spy:
        def encode(self, *args, **kwargs):
            calls.append(len(args[0]))
            return tiny_tokenizer.sp.encode(*args, **kwargs)

    monkeypatch.setattr(fast_bpe, "MAX_TEXT_BYTES", max(map(len, texts)) - 1)
    monkeypatch.setattr(tiny_tokenizer.fast, "sentencepiece", Spy())
    ids, lengths = tiny_tokenizer.fast.encode(texts)
    expected = tiny_tokenizer.sp.encode(texts, out_type=int)
    assert calls == [len(texts)]
    assert ids.tolist() == [i for text in expected for i in text] and lengths.tolist() == list(map(len, expected))


@needs_compiler
def test_a_pickled_or_copied_tokenizer_keeps_the_fast_encoder(tiny_tokenizer, tiny_tokenizer_dir):
    for original in (tiny_tokenizer, load_encoder(tiny_tokenizer_dir)):
        for twin in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
            assert twin.fast is not None and twin.fast.model != original.fast.model
            assert twin.encode_batch(SAMPLE_TEXT) == original.sp.encode(SAMPLE_TEXT, out_type=int)


@needs_compiler
def test_texts_with_more_ids_than_bytes(tmp_path):
    """Bad bytes become U+FFFD, three bytes, and fall back to three byte ids each when U+FFFD is no piece."""
    encoder = load_encoder(train_model(tmp_path))
    assert encoder.sp.piece_to_id("\ufffd") == encoder.sp.unk_id()
    texts = [b"\xff" * 1000, b"\xff\xfe" * 300 + " 高血压 ".encode(), b"ok"]
    for batch in ([texts[0]], texts):
        ids, lengths = encoder.fast.encode(batch)
        assert lengths[0] > 3 * 999 and ids.tolist() == [i for ids in encoder.sp.encode(batch) for i in ids]
