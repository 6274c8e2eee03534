"""Checkpoints: one self-describing file, written atomically; the one loader every script uses.

A checkpoint holds the fp32 master weights, optimizer and grad-scaler state, the global step, the
phase, the data sampler's state, every RNG, the config, the model arguments and the tokenizer's
fingerprint. Under FSDP2 the optimizer and the sharded weights resume from a
torch.distributed.checkpoint folder (`<name>.dcp/`, one shard per rank); the `<name>` file beside it
holds everything else and the full weights gathered for inference, so every reader loads it alike.
"""

import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model import ModelArgs, Transformer


def atomic_save(obj, path):
    """torch.save to a temp name, then rename: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this project (no model_args)")
    return ckpt


def load_model(path, device="cpu", tokenizer=None):
    """(model in eval mode, checkpoint dict). Refuses checkpoints whose weights don't match their own
    model_args (strict loading: no silently missing keys) or whose tokenizer differs from `tokenizer`."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model") is None:
        raise ValueError(f"{path} holds no model weights")
    args = ModelArgs(**ckpt["model_args"])
    if tokenizer is not None and ckpt.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(f"{path} was trained with a different tokenizer (sha256 {ckpt['tokenizer_fingerprint'][:12]}…, "
                         f"given {tokenizer.fingerprint[:12]}…): pass the tokenizer it was trained with")
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {args.vocab_size}")
    model = Transformer(args)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model arguments stored with them:\n{err}") from None
    return model.to(device).eval(), ckpt


def model_checkpoint(model, model_args: ModelArgs, **meta):
    """A checkpoint dict: the model's weights in fp32 on CPU, its arguments, and `meta`."""
    return {"model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "model_args": asdict(model_args), **meta}
