"""The project's tokenizer: ChatGLM2-6B's SentencePiece model, or one made by train_tokenizer.py.

from chatglm_tokenizer import load_tokenizer
tok = load_tokenizer()                       # chatglm_tokenizer/tokenizer.model
tok = load_tokenizer("out/tokenizer")        # a folder (or a .model file) of your own
ids = load_encoder()                         # the same ids without transformers: encode_batch, eos_id, ...
ids.fast                                     # fast_bpe.c's encoder (same ids, 2-4x faster), or None: see
                                             # ids.fast_unavailable
"""

from pathlib import Path

from . import fast_bpe
from .sentencepiece_ids import SPECIAL_TOKENS, SentencePieceIds

DEFAULT_DIR = Path(__file__).resolve().parent

MISSING_MODEL = """no tokenizer model at {path}
Two ways to get one:
  1. ChatGLM2-6B's tokenizer (what this project uses): it lives in the THUDM/chatglm2-6b model
     repository. `python -m chatglm_tokenizer.download` puts it at chatglm_tokenizer/tokenizer.model
     (set HF_ENDPOINT=https://hf-mirror.com where huggingface.co is unreachable), or copy
     tokenizer.model from any checkout of that repository there.
  2. Train your own on your corpus: `python train_tokenizer.py --source text=PATH --out out/tokenizer`
     and pass --tokenizer out/tokenizer (the quickstart does this when 1. is missing)."""


def tokenizer_model_path(path=DEFAULT_DIR):
    """The .model file a tokenizer path names: the file itself, or tokenizer.model inside a folder."""
    path = Path(path)
    return path if path.suffix == ".model" else path / "tokenizer.model"


def existing_model_file(path):
    model_file = tokenizer_model_path(path)
    if not model_file.is_file():
        raise FileNotFoundError(MISSING_MODEL.format(path=model_file))
    return str(model_file)


def load_tokenizer(path=DEFAULT_DIR):
    """The transformers tokenizer (encode, decode, chat use, save_pretrained)."""
    from .tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(vocab_file=existing_model_file(path))
    fast_bpe.attach(tokenizer)
    return tokenizer


def load_encoder(path=DEFAULT_DIR) -> SentencePieceIds:
    """The same ids for corpus processing: encode_batch, eos_id, vocab_size, fingerprint; no transformers."""
    encoder = SentencePieceIds(existing_model_file(path))
    fast_bpe.attach(encoder)
    return encoder


def __getattr__(name):
    if name == "ChatGLMTokenizer":  # imported on first use: it brings in transformers
        from .tokenization_chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DIR",
    "SPECIAL_TOKENS",
    "ChatGLMTokenizer",
    "SentencePieceIds",
    "load_encoder",
    "load_tokenizer",
    "tokenizer_model_path",
]
