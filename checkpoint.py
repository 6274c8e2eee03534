"""Checkpoints and the runs that own them: one self-describing file, written atomically; the one loader
every script uses.

A checkpoint holds the fp32 master weights, optimizer and grad-scaler state, the global step, the
phase, the data sampler's state, every RNG, the config, the model arguments, the tokenizer's
fingerprint and the id of the run that wrote it. Under FSDP2 the optimizer and the sharded weights
resume from a torch.distributed.checkpoint folder (`<name>.dcp-<step>/`, one shard per rank); the `<name>`
file beside it holds everything else and the full weights gathered for inference, so every reader
loads it alike.

Checkpoints are data, not code: they are read with torch.load(weights_only=True), which unpickles
tensors and plain containers only, so a crafted file cannot run anything.

A run owns its out_dir. Starting one writes out_dir/run.json with a fresh run id; resuming reads it,
and only checkpoints carrying that id count ("the latest" is the latest of this run by step, never a
file an earlier run left behind). Starting from scratch over a folder that holds a run is refused
unless asked (--overwrite=True moves the earlier run aside).
"""

import json
import os
import random
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from atomic import atomic_write, atomic_write_text
from model import ModelArgs, Transformer

RUN_FILE = "run.json"
# numpy's RNG state holds an array; these rebuild arrays and nothing else (checkpoints written before
# rng_state stored plain lists need them)
NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def atomic_save(obj, path):
    """torch.save through atomic.atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state():
    """Every RNG as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The checkpoint dict, or CheckpointError naming the file: missing, not a torch file (truncated,
    junk), holding objects other than tensors and plain containers, or not one of this project's.
    mmap=True maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises pickle, zip and OS errors alike for a bad file
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, which would run "
                "code when loaded: refused (use a checkpoint this project wrote)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not a torch file: "
            f"{type(err).__name__}); use another one, e.g. an earlier phase's"
        ) from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model_args)")
    return ckpt


def checkpoint_meta(path):
    """A checkpoint's dict with its tensors memory-mapped, not read: step, phase, run id and the rest."""
    return load_checkpoint(path, mmap=True)


def text_model_meta(path):
    """checkpoint_meta of the checkpoint a text fine-tuning run (sft.py, dpo.py) starts from: a vision-language
    one is refused here, before the run claims its out_dir."""
    meta = checkpoint_meta(path)
    if "vision" in meta.get("model_args", {}):
        raise CheckpointError(
            f"{path} is a vision-language checkpoint: fine-tune it with vlm_train.py (stage instruct, LoRA too), "
            "or start from a text checkpoint"
        )
    return meta


def load_model(path, device="cpu", tokenizer=None):
    """(model in eval mode, checkpoint dict). Refuses checkpoints whose weights don't match their own
    model_args (strict loading: no silently missing keys) or whose tokenizer differs from `tokenizer`."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model") is None:
        raise CheckpointError(f"{path} holds no model weights")
    args = ModelArgs(**ckpt["model_args"])
    if tokenizer is not None and ckpt.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise CheckpointError(
            f"{path} was trained with a different tokenizer (sha256 "
            f"{ckpt['tokenizer_fingerprint'][:12]}…, given {tokenizer.fingerprint[:12]}…): "
            "pass the tokenizer it was trained with"
        )
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {args.vocab_size}")
    if ckpt.get("lora"):
        base = (ckpt.get("base") or {}).get("path", "its base checkpoint")
        raise CheckpointError(
            f"{path} holds the LoRA adapters of a run, not a model: fold them into their base with merge_lora.py "
            f"--ckpt {base} --adapter {Path(path).parent / 'adapter'} --out merged.pt (chat.py, eval.py and "
            "serve.py also take that --ckpt and --adapter)"
        )
    model = Transformer(args)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the model arguments stored with them:\n{err}") from None
    check_finite(model, path)
    return model.to(device).eval(), ckpt


def check_finite(model, path):
    """Refuse loaded weights that hold NaN or inf: every logit would be NaN (chat would print nothing, eval
    score 0, an export compare NaN with NaN)."""
    damaged = [name for name, weight in model.state_dict().items() if not torch.isfinite(weight).all()]
    if damaged:
        raise CheckpointError(
            f"{path}: {len(damaged)} weight tensor(s) hold NaN or inf values (e.g. {damaged[0]}): a damaged or "
            "diverged checkpoint; use an earlier one"
        )


def check_model_args(ckpt, args, path):
    """The checkpoint's model must have the shape of `args` (dropout may differ)."""
    mine, theirs = asdict(args), dict(ckpt["model_args"])
    mine.pop("dropout"), theirs.pop("dropout", None)
    if mine != theirs:
        raise CheckpointError(
            f"{path}: model arguments differ from the config:\n  checkpoint {theirs}\n  config     {mine}"
        )


def model_checkpoint(model, model_args: ModelArgs, trained_only=False, **meta):
    """A checkpoint dict: the model's weights in fp32 on CPU, its arguments, and `meta`. trained_only: only the
    weights that train (a LoRA run's adapters: the rest is its base checkpoint, which meta["base"] names)."""
    keep = trained_keys(model) if trained_only else None
    return {
        "model": {k: v.detach().float().cpu() for k, v in model.state_dict().items() if keep is None or k in keep},
        "model_args": asdict(model_args),
        **meta,
    }


def trained_keys(model):
    """The state-dict keys of the weights that train (requires_grad)."""
    return {k for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


def load_weights(model, weights, path, trained_only=False):
    """Load a checkpoint's weights into `model`: all of them (strictly), or with trained_only exactly the weights
    that train (the frozen ones are in place already, from the base checkpoint)."""
    expected = trained_keys(model) if trained_only else set(model.state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"{path}: weights do not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    model.load_state_dict(weights, strict=not trained_only)


def base_record(path):
    """What identifies the checkpoint a run builds on (LoRA's frozen base, DPO's reference): path, run id, step."""
    meta = checkpoint_meta(path)
    return {"path": str(path), "run_id": meta.get("run_id"), "step": meta.get("step")}


def check_base(record):
    """The path of the base checkpoint a resumed run was built on, unchanged since; CheckpointError otherwise."""
    now = base_record(record["path"])
    if (now["run_id"], now["step"]) != (record["run_id"], record["step"]):
        raise CheckpointError(
            f"{record['path']} is no longer the checkpoint this run was built on (run {record['run_id']}, step "
            f"{record['step']}; now run {now['run_id']}, step {now['step']}): put that checkpoint back to resume, "
            "or start a new run"
        )
    return Path(record["path"])


# ---------------------------------------------------------------------------- runs


def run_id_of(out_dir):
    """The id in out_dir/run.json; None for a folder without one (written before run ids existed: then
    every checkpoint without an id belongs to it)."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["run_id"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f'{path} is not a run file (expected {{"run_id": ...}}): restore it, or start '
            "the run again with --overwrite=True"
        ) from None


def holds_a_run(out_dir):
    """What in out_dir belongs to an earlier run (run.json, a log, checkpoints), as a short list. A run.json
    alone is a run refused before its first step (bad data, a config mistake): nothing to keep, so the
    corrected command may start there."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in (out / "log.jsonl", out / "ckpt.pt") if p.is_file()] + sorted(out.glob("*/ckpt.pt"))
    return [out / RUN_FILE] + found if found and (out / RUN_FILE).is_file() else found


def start_run(out_dir, overwrite, script):
    """Claim out_dir for a new run: refuse a folder that holds one unless `overwrite`, which renames it to
    out_dir.replaced-<time>. Returns the new run id (written to out_dir/run.json)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out_dir {out} is a file, not a folder: pick another --out_dir")
    earlier = holds_a_run(out)
    if earlier and not overwrite:
        shown = ", ".join(str(p) for p in earlier[:3]) + (" ..." if len(earlier) > 3 else "")
        raise CheckpointError(
            f"{out} holds an earlier run ({shown}): continue it with --init_from=resume, pass "
            "--overwrite=True to move it aside, or choose another --out_dir"
        )
    if earlier:
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        print(f"moved the earlier run in {out} aside to {aside} (--overwrite)")
    run_id = uuid.uuid4().hex
    atomic_write_text(out / RUN_FILE, json.dumps({"run_id": run_id, "script": script, "started": time.time()}) + "\n")
    return run_id


def claim_run(out_dir, resume, source, meta, overwrite, script, dist):
    """The run id of a fine-tuning run in out_dir: its own when resuming (`source`, whose metadata is `meta`,
    must be a checkpoint of that run), else a new run claimed by rank 0 (start_run) and broadcast."""
    if resume:
        run_id = run_id_of(out_dir)
        if meta.get("run_id") != run_id:
            raise CheckpointError(f"{source} belongs to another run than {out_dir}/run.json: start a new run instead")
        return run_id
    return dist.from_master(lambda: start_run(out_dir, overwrite, script))


def check_tokenizer(meta, source, tok, tokenizer_name):
    """A checkpoint trained with another tokenizer than `tok` is refused (its ids would mean other text)."""
    if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise CheckpointError(f"{source} was trained with another tokenizer than {tokenizer_name}")


def latest_checkpoint(paths, run_id):
    """(step, path) of the checkpoint with the highest step among `paths` that belongs to run `run_id`,
    or None. Only the metadata is read."""
    found = []
    for path in paths:
        meta = checkpoint_meta(path)
        if meta.get("run_id") == run_id:
            found.append((meta["step"], str(path)))
    return max(found) if found else None
