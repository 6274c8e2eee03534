"""Shared fixtures: the real ChatGLM2 tokenizer (skipped when absent) and a tiny one trained here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm_tokenizer import fast_bpe, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SAMPLE_SOURCES = json.loads((SAMPLE / "sources.json").read_text(encoding="utf-8"))  # the quickstart's too
# CI clones the repository with ../shared beside it; a user who downloaded the file has it in-tree.
REAL_TOKENIZER_CANDIDATES = [
    ROOT / "chatglm_tokenizer" / "tokenizer.model",
    ROOT.parent / "shared" / "chatglm_tokenizer" / "tokenizer.model",
]

# A few lines every tiny tokenizer sees, so round trips cover more than the sample's characters.
EXTRA_TEXT = (
    "Mixed text: English, digits 0123456789, 3.14%, emoji 😀👍🏽, tabs\tand  spaces.\n"
    "高血压患者应定期监测血压，遵医嘱服药。糖尿病需要控制饮食、规律运动。\n"
)


# chatglm_tokenizer/fast_bpe.c is built with the system C compiler; CI installs one (.ci/run).
needs_compiler = pytest.mark.skipif(
    fast_bpe.compiler() is None, reason="no C compiler (cc) to build chatglm_tokenizer/fast_bpe.c"
)


def real_tokenizer_path():
    return next((p for p in REAL_TOKENIZER_CANDIDATES if p.is_file()), None)


@pytest.fixture(scope="session")
def chatglm_tokenizer():
    path = real_tokenizer_path()
    if path is None:
        pytest.skip("ChatGLM2 tokenizer.model not available (../shared/chatglm_tokenizer/)")
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A 2000-piece tokenizer trained on the sample's plain-text files (a second or two)."""
    import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.rglob("*.txt"))] + [EXTRA_TEXT] * 20
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer.train(texts, out, vocab_size=2000)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tokenizer(request):
    """The real tokenizer when present, else the tiny one: tests that only need *a* tokenizer."""
    if real_tokenizer_path() is not None:
        return load_tokenizer(real_tokenizer_path())
    return request.getfixturevalue("tiny_tokenizer")


# ---------------------------------------------------------------------------- token shards
SOURCES = ["general", "medical", "guide"]


def write_source(root, name, sizes, seed=0, tokenizer_sha256="any"):
    """Shards of a learnable synthetic stream (counting sequences with an occasional eos, 2) and the
    manifest.json data_process.py would write beside them."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    shards = []
    for i, n in enumerate(sizes):
        tokens = (np.arange(n) % 97 + 3 + 100 * SOURCES.index(name) % 150).astype(np.uint16)
        tokens[rng.random(n) < 0.02] = 2
        tokens.tofile(root / name / f"{name}_{i:04d}.bin")
        shards.append({"file": f"{name}_{i:04d}.bin", "tokens": n})
    manifest = {"name": name, "tokenizer": {"sha256": tokenizer_sha256}, "shards": shards}
    (root / name / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tokens")
    sha = tiny_tokenizer.fingerprint  # the tokenizer the pretrain.py runs of the tests pass
    write_source(
        root, "general", [6000, 3000, 20], tokenizer_sha256=sha
    )  # the 20-token shard is too small for a window
    write_source(root, "medical", [5000], tokenizer_sha256=sha)
    write_source(root, "guide", [4000, 4000], tokenizer_sha256=sha)
    return root


# ---------------------------------------------------------------------------- tiny models and checkpoints
def tiny_model(vocab_size, **shape):
    """A random Transformer of the tests' small shape (d64, 2 layers, 4 heads sharing 2 kv heads, context 96;
    `shape` overrides), seed 0, in eval mode."""
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=96) | shape
    return Transformer(ModelArgs(**args)).eval()


def wander(model, std=0.2, keep=("tok_embeddings", "llm.tok_embeddings", "vision.")):
    """Redraw the model's matrices (but the embedding's, and a VLM's tower) at ~10x the usual init, so that
    greedy decoding wanders over the vocabulary: at the usual scale the tied embedding makes a fresh model
    repeat its last token, and a test of decoding would compare repetitions."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(keep):
                p.normal_(0, std)
    return model


def quiet_config(**over):
    """A training config for in-process Trainer tests: fp32, lr 1e-2, every step logged, no evaluation,
    saving, progress bar or TensorBoard unless `over` asks."""
    from trainer import default_config

    cfg = default_config(
        dtype="float32",
        grad_accum=1,
        learning_rate=1e-2,
        eval_interval=0,
        eval_windows=2,
        log_interval=1,
        save_interval=0,
        progress=False,
        tensorboard=False,
    )
    return cfg | over


def save(model, path, tok, step=5, **meta):
    """The model as a checkpoint file of this project (tokenizer fingerprint, step, `meta`); its path as text."""
    from checkpoint import atomic_save, model_checkpoint

    atomic_save(model_checkpoint(model, model.args, tokenizer_fingerprint=tok.fingerprint, step=step, **meta), path)
    return str(path)
