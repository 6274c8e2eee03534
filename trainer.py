"""The one training loop, shared by pretrain.py, sft.py and vlm_train.py. It knows nothing about which data
it gets: anything with train_batches(step, micro_steps, batch_size, rank, world) and
val_batches(batch_size, max_windows, rank, world) will do (dataset.PretrainData, dataset_sft.SFTData,
dataset_vlm.VLMData). A batch is (x, y) or (x, y, extras): extras is a dict of tensors passed on as
model(x, y, reduction="sum", **extras) (a VLM's images).

What it does: torchrun/DDP/FSDP2 set-up (NCCL on GPU, gloo on CPU), autocast in the dtype asked
for, gradient accumulation that syncs only on the last micro-step, a loss normalised by the global
number of target tokens (so 2 ranks x batch 4 == 1 rank x batch 8 == accumulation 2 x batch 4),
the WSD learning-rate schedule, fused AdamW, clipping, a NaN guard, evaluation, atomic checkpoints
that resume bit-exactly, and logs (JSONL, TensorBoard if installed, tqdm, loss.png).
"""

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import (CheckpointError, atomic_save, atomic_write_text, load_checkpoint, model_checkpoint, rng_state,
                        set_rng_state)
from model import IGNORE_INDEX
from plot import read_log
from precision import CHOICES, CUDA_PEAK_FLOPS, Precision, autocast, matmul_peak, resolve



# ---------------------------------------------------------------------------- distributed set-up
class Dist:
    """Where this process runs. Without torchrun: one process, rank 0, no process group."""

    def __init__(self, device="auto", timeout_s=1800):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("device=cuda but torch sees no GPU (a CPU build of torch? see README 'GPU set-up')")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        # under torchrun even one process joins a process group, so DDP/FSDP run as they will on many
        self.enabled = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.is_master = self.rank == 0

    def all_sum(self, value, op="sum"):
        """Sum (or max) of a float over ranks (a plain float back)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t.item())

    def broadcast(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.barrier()  # an FSDP2 + checkpoint run aborted at exit without it
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- config checks
DECAY_SHAPES = ("exp", "linear", "1-sqrt", "cosine")


def check_config(cfg):
    """Every training key a script has, checked before anything is built or loaded: a bad value stops the
    run at once with one line naming the key, not thousands of steps later (a decay shape is first used
    when the decay starts) or never (grad_accum=0 "trains" on nothing)."""
    rules = {
        "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"),
        "learning_rate": (lambda v: v > 0, "> 0"), "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "warmup_iters": (lambda v: v >= 0, ">= 0"), "decay_shape": (lambda v: v in DECAY_SHAPES, f"one of {DECAY_SHAPES}"),
        "decay_half_life": (lambda v: v >= 0, ">= 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
        "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"), "dtype": (lambda v: v in CHOICES, f"one of {CHOICES}"),
        "parallel": (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
        "nan_policy": (lambda v: v in ("stop", "skip"), "stop or skip"), "max_nan_skips": (lambda v: v >= 0, ">= 0"),
        "eval_interval": (lambda v: v >= 0, ">= 0 (0: no evaluation)"), "eval_windows": (lambda v: v >= 1, ">= 1"),
        "log_interval": (lambda v: v >= 1, ">= 1"), "save_interval": (lambda v: v >= 0, ">= 0 (0: at the end only)"),
        "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "peak_flops": (lambda v: v >= 0, ">= 0"), "stop_at": (lambda v: v >= 0, ">= 0 (0: never)"),
        "epochs": (lambda v: v > 0, "> 0"), "max_iters": (lambda v: v >= 0, ">= 0 (0: from epochs)"),
        "sampling": (lambda v: v in ("random", "sequential"), "random or sequential"),
        "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    }
    for key, (ok, what) in rules.items():
        if key in cfg and not ok(cfg[key]):
            raise SystemExit(f"config: {key} must be {what}, not {cfg[key]!r}")


# ---------------------------------------------------------------------------- learning rate
def wsd_lr(step, lr, warmup, decay_start, total, shape="1-sqrt", min_ratio=0.0, half_life=None):
    """Warmup-Stable-Decay (MiniCPM). Linear warmup over `warmup` steps to `lr`; `lr` until
    `decay_start`; then decay to lr * min_ratio at `total` with the chosen shape:
    "exp" (MiniCPM: halves every half_life steps, default so that it reaches min_ratio at the end,
    floored there), "linear", "1-sqrt" (Hagele et al. 2024) or "cosine"."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start:
        return lr
    length = max(1, total - decay_start)
    x = min(step - decay_start, length)
    p = x / length
    if shape == "exp":
        half_life = half_life or length / math.log2(1 / max(min_ratio, 1e-3))
        return lr * max(min_ratio, 0.5 ** (x / half_life))
    if shape == "linear":
        f = 1 - p
    elif shape == "1-sqrt":
        f = 1 - math.sqrt(p)
    elif shape == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * p))
    else:
        raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, not {shape!r}")
    return lr * (min_ratio + (1 - min_ratio) * f)


def make_optimizer(model, lr, weight_decay, betas, device, fused=True):
    """AdamW; matrices decay, norms and other 1-D weights don't. Fused kernel where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # fused AdamW not built for this device/dtype
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type == "cuda")


# ---------------------------------------------------------------------------- data prefetch
class Prefetcher:
    """Builds step s+1's batches on a thread while step s computes (SFT tokenizes on the fly).
    Each item carries the sampler's state after its step, which is what a checkpoint must store."""

    def __init__(self, make, first, last):
        self.make, self.next, self.last = make, first, last
        self.thread, self.result = None, None
        self._start()

    def _start(self):
        if self.next >= self.last:
            return
        step = self.next

        def work():
            try:
                self.result = (step, self.make(step), None)
            except BaseException as err:  # re-raised in the training thread
                self.result = (step, None, err)
        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def get(self, step):
        self.thread.join()
        got, item, err = self.result
        if err is not None:
            raise err
        assert got == step, f"prefetched step {got}, asked for {step}"
        self.next = step + 1
        self._start()
        return item


# ---------------------------------------------------------------------------- the trainer
def on_device(batch, device):
    """(x, y, extras) of a batch (x, y) or (x, y, extras), on `device`."""
    x, y, *rest = batch
    extras = rest[0] if rest else {}
    return (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
            {k: v.to(device, non_blocking=True) for k, v in extras.items()})


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, model, cfg, dist_ctx, tokenizer_fingerprint=None, run_id=None, trained_dtype=None):
        """trained_dtype: the dtype_trained of the checkpoint a resumed run continues from (dtype=auto keeps it)."""
        self.cfg, self.dist = cfg, dist_ctx
        self.device = dist_ctx.device
        if cfg["dtype"] == "auto" and trained_dtype:  # a run goes on in the precision it started in
            choice = Precision(trained_dtype, "auto: the precision this run was trained in")
        else:
            choice = resolve(cfg["dtype"], self.device, "train", dim=model.args.dim)
        # every rank computes in rank 0's choice, whatever its own probe measured
        self.precision = dist_ctx.broadcast(choice)
        self.dtype = self.precision.dtype
        self.run_id = run_id
        self.raw_model = model.to(self.device)  # unwrapped: what checkpoints hold
        self.model_args = model.args
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.fsdp = cfg.get("parallel", "ddp") == "fsdp" and dist_ctx.enabled
        if cfg.get("compile"):
            model.compile_for_training()
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (dist_ctx.world,))  # explicit mesh: gloo needs it
            policy = MixedPrecisionPolicy(param_dtype=None if self.dtype == "float32" else self.precision.torch_dtype,
                                          reduce_dtype=torch.float32)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            self.model = model
        elif dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = model
        self.optimizer = make_optimizer(model, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]),
                                        self.device, cfg.get("fused_adamw", True))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.step = 0
        self.log_records = []
        self.tb = None

    # ---- one optimizer step ----
    def sync_gradients(self, sync):
        """DDP: no all-reduce on the micro-steps before the last (baby-llama2 never synced with
        accumulation > 1); FSDP2: no reduce-scatter."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.dist.enabled and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batches, lr):
        """Forward/backward over this rank's micro-batches, then clip and step. Returns
        (mean loss over all ranks' target tokens, grad norm, target tokens), or raises NonFiniteLoss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_tokens = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)
        tokens = self.dist.all_sum(local_tokens)
        # sum-loss / global token count, times world because DDP/FSDP average gradients over ranks
        scale = self.dist.world / max(tokens, 1)
        loss_sum = 0.0
        self.model.train()
        for i, batch in enumerate(batches):
            x, y, extras = on_device(batch, self.device)
            with self.sync_gradients(i == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss = self.model(x, y, reduction="sum", **extras)
                self.scaler.scale(loss * scale).backward()
            loss_sum += loss.item()
        mean_loss = self.dist.all_sum(loss_sum) / max(tokens, 1)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {mean_loss} at step {self.step}")
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg["grad_clip"] or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.scaler.step(self.optimizer)  # skips the update itself when fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, norm, tokens

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self, data, weights=None):
        """{source: mean loss per target token} on held-out data, plus "val": the weighted mean."""
        self.model.eval()
        losses = {}
        for name, batches in data.val_batches(self.cfg["batch_size"], self.cfg["eval_windows"], self.dist.rank, self.dist.world).items():
            # FSDP2 ranks must run the same number of forwards (each all-gathers weights): pad with
            # batches whose targets are all ignored, which add nothing to the sum or the count
            missing = int(self.dist.all_sum(len(batches), op="max")) - len(batches)
            filler = torch.zeros(1, self.model_args.max_seq_len, dtype=torch.long)
            batches = list(batches) + [(filler, torch.full_like(filler, IGNORE_INDEX))] * missing
            total, count = 0.0, 0
            for batch in batches:
                x, y, extras = on_device(batch, self.device)
                with autocast(self.device, self.dtype):
                    total += float(self.model(x, y, reduction="sum", **extras))
                count += int((y != IGNORE_INDEX).sum())
            total, count = self.dist.all_sum(total), self.dist.all_sum(count)
            if count:
                losses[name] = total / count
        if losses:
            w = weights or {n: 1.0 for n in losses}
            norm = sum(w.get(n, 0) for n in losses) or 1
            losses["val"] = sum(losses[n] * w.get(n, 0) for n in losses) / norm
        return losses

    # ---- checkpoints ----
    def checkpoint_state(self, phase, data_state):
        return {"optimizer": None if self.fsdp else self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "phase": phase, "data_state": data_state,
                "rng": rng_state(), "config": self.cfg, "run_id": self.run_id,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "dtype_trained": self.dtype}

    def save(self, path, phase, data_state):
        """Write the checkpoint (atomically); a failed write (a full disk) stops every rank with
        CheckpointError, and the previous checkpoint is left as it was."""
        for p in self.raw_model.parameters():  # never replace a good checkpoint with a broken model
            if not torch.isfinite(p.detach()).all():
                raise NonFiniteLoss(f"non-finite weights at step {self.step}: checkpoint {path} not written")
        state = self.checkpoint_state(phase, data_state)
        error = None
        try:
            if self.fsdp:
                self._save_fsdp(Path(path), state)
            elif self.dist.is_master:
                atomic_save(model_checkpoint(self.raw_model, self.model_args, **state), path)
        except OSError as err:
            error = err.strerror or str(err)
        if self.dist.all_sum(error is not None, op="max"):
            raise CheckpointError(f"step {self.step}: {error or 'another rank could not write its checkpoint part'}; "
                                  "nothing was replaced: the checkpoints written before are intact (free disk space, "
                                  "then --init_from=resume)")
        self.dist.barrier()

    def _save_fsdp(self, path, state):
        """The sharded folder is written under a new name per step, then ckpt.pt (renamed into place last)
        points to it: a kill at any moment leaves ckpt.pt naming a complete folder. Older folders of the
        same checkpoint are removed after."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        shards = path.with_name(f"{path.name}.dcp-{self.step:09d}")
        tmp = shards.with_name(shards.name + ".tmp")
        if self.dist.is_master and tmp.exists():
            shutil.rmtree(tmp)
        self.dist.barrier()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        # every rank's RNG (dropout masks differ per rank), then the full weights for inference
        rngs = [None] * self.dist.world
        dist.all_gather_object(rngs, state["rng"])
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.dist.barrier()
        if self.dist.is_master:
            if shards.exists():
                shutil.rmtree(shards)
            os.replace(tmp, shards)
            atomic_save({**state, "rng": rngs, "model": full, "model_args": asdict(self.model_args),
                         "sharded": shards.name}, path)
            for old in path.parent.glob(f"{path.name}.dcp*"):
                if old.name != shards.name and old.is_dir() and old.parent == path.parent:
                    shutil.rmtree(old)

    def check_shape(self, ckpt, path):
        """The checkpoint's model must have this model's shape (dropout may differ)."""
        mine, theirs = asdict(self.model_args), dict(ckpt["model_args"])
        mine.pop("dropout"), theirs.pop("dropout", None)
        if mine != theirs:
            raise CheckpointError(f"{path}: model arguments differ from the config:\n  checkpoint {theirs}\n  config     {mine}")

    def load(self, path):
        """Restore weights, optimizer, scaler, step and RNG; returns the checkpoint dict."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.check_shape(ckpt, path)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            name = str(ckpt.get("sharded") or "")
            if Path(name).name != name or not name.startswith(Path(path).name + ".dcp"):
                raise CheckpointError(f"{path} names its shards {name!r}, not a folder beside it: refused")
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(Path(path).parent / name))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            set_rng_state(ckpt["rng"][self.dist.rank])
        else:
            self.raw_model.load_state_dict(ckpt["model"], strict=True)
            if ckpt.get("optimizer") is None:
                raise CheckpointError(f"{path} holds no optimizer state to resume from (an FSDP2 checkpoint? resume with "
                                      "parallel=fsdp)")
            self.optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"] if isinstance(ckpt["rng"], dict) else ckpt["rng"][self.dist.rank])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        return ckpt

    def load_weights(self, path):
        """Start from another run's weights (a previous phase, or pretraining for SFT): fresh optimizer."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.check_shape(ckpt, path)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        else:
            self.raw_model.load_state_dict(ckpt["model"], strict=True)
        return ckpt

    # ---- logging ----
    def log(self, record, log_path):
        record = {"time": time.time(), **record}
        self.log_records.append(record)
        if not self.dist.is_master:
            return
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is None and self.cfg.get("tensorboard", True):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(log_path).parent / "tensorboard"))
            except ImportError:
                self.tb = False
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(key, value, record["step"])

    # ---- the loop ----
    def run(self, data, first_step, last_step, lr_at, log_path, ckpt_path, phase="train", data_weights=None, desc=None):
        """Train steps [first_step, last_step) on `data`, saving `ckpt_path` every save_interval steps
        and at the end. `lr_at(step)` gives the learning rate of a (global) step."""
        cfg, d = self.cfg, self.dist
        self.step = first_step
        micro, batch_size = cfg["grad_accum"], cfg["batch_size"]
        seq_len = self.model_args.max_seq_len
        peak = cfg.get("peak_flops") or (CUDA_PEAK_FLOPS if self.device.type == "cuda"
                                         else matmul_peak(str(self.device), self.dtype))
        flops_per_token = self.raw_model.flops_per_token(seq_len)

        def make(step):
            batches = data.train_batches(step, micro, batch_size, d.rank, d.world)
            return batches, data.state_dict()

        prefetch = Prefetcher(make, first_step, last_step)
        if d.is_master and Path(log_path).exists():  # a resumed run redoes the steps after its checkpoint: drop them
            kept = [r for r in read_log(log_path) if r["step"] < first_step
                    or r["step"] == first_step and r.get("event") != "start"]
            atomic_write_text(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        self.log({"step": first_step, "phase": phase, "event": "start"}, log_path)  # marks the boundary in plots
        bar = tqdm(total=last_step - first_step, desc=desc or phase, disable=not d.is_master or not cfg.get("progress", True),
                   dynamic_ncols=True)
        skipped_in_a_row, data_state, losses = 0, data.state_dict(), {}
        while self.step < last_step:
            batches, next_state = prefetch.get(self.step)
            lr = lr_at(self.step)
            t0 = time.perf_counter()
            try:
                loss, norm, tokens = self.train_step(batches, lr)
                skipped_in_a_row = 0
            except NonFiniteLoss as err:
                skipped_in_a_row += 1
                message = f"[{phase}] {err}"
                if cfg.get("nan_policy", "stop") == "stop" or skipped_in_a_row > cfg.get("max_nan_skips", 10):
                    raise NonFiniteLoss(message + f"; stopped. The last good checkpoint is {ckpt_path} "
                                        "(lower learning_rate, or nan_policy=skip)") from None
                if d.is_master:
                    tqdm.write(message + "; update skipped (nan_policy=skip)")
                self.log({"step": self.step, "phase": phase, "skipped": "non-finite loss", "lr": lr}, log_path)
                loss = None
            dt = time.perf_counter() - t0
            self.step += 1
            data_state = next_state
            bar.update(1)
            if loss is not None:
                tok_s = sum(batch[1].numel() for batch in batches) * d.world / max(dt, 1e-9)
                record = {"step": self.step, "phase": phase, "loss": loss, "lr": lr, "grad_norm": norm,
                          "tokens_per_sec": tok_s, "mfu": tok_s * flops_per_token / peak, "target_tokens": int(tokens)}
                if self.device.type == "cuda":
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.step % cfg["log_interval"] == 0 or self.step == last_step:
                    self.log(record, log_path)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg["eval_interval"] and (self.step % cfg["eval_interval"] == 0 or self.step == last_step):
                losses = self.evaluate(data, data_weights)
                if losses:
                    self.log({"step": self.step, "phase": phase, **{f"val/{k}": v for k, v in losses.items()}}, log_path)
                    if d.is_master:
                        train = f"train {loss:.4f}, " if loss is not None else ""
                        tqdm.write(f"[{phase}] step {self.step}: {train}val {losses['val']:.4f} "
                                   + " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "val"))
            if self.step == last_step or (cfg["save_interval"] and self.step % cfg["save_interval"] == 0):
                self.save(ckpt_path, phase, data_state)
        bar.close()
        return losses
