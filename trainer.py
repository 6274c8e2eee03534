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
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import atomic_save, load_checkpoint, model_checkpoint, rng_state, set_rng_state
from model import IGNORE_INDEX

PEAK_FLOPS = {"cuda": 989e12, "cpu": 0.4e12}  # H100 SXM bf16 dense; this repo's 2-core dev VM, bf16 (`python bench.py peak` measures yours)


# ---------------------------------------------------------------------------- distributed set-up
class Dist:
    """Where this process runs. Without torchrun: one process, rank 0."""

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
        self.enabled = self.world > 1
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

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.barrier()  # an FSDP2 + checkpoint run aborted at exit without it
            dist.destroy_process_group()


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
        raise ValueError(f"decay_shape must be exp, linear, 1-sqrt or cosine, not {shape!r}")
    return lr * (min_ratio + (1 - min_ratio) * f)


# ---------------------------------------------------------------------------- precision
def resolve_dtype(dtype, device):
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16"  # AVX512-BF16/AMX CPUs run bf16 matmuls 2-7x faster than fp32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return dtype


def autocast(device, dtype):
    """The autocast context for exactly the dtype asked for (float32: none)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


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
    def __init__(self, model, cfg, dist_ctx, tokenizer_fingerprint=None):
        self.cfg, self.dist = cfg, dist_ctx
        self.device = dist_ctx.device
        self.dtype = resolve_dtype(cfg["dtype"], self.device)
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
            policy = MixedPrecisionPolicy(param_dtype=None if self.dtype == "float32" else getattr(torch, self.dtype),
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
                "rng": rng_state(), "config": self.cfg,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "dtype_trained": self.dtype}

    def save(self, path, phase, data_state):
        for p in self.raw_model.parameters():  # never replace a good checkpoint with a broken model
            if not torch.isfinite(p.detach()).all():
                raise NonFiniteLoss(f"non-finite weights at step {self.step}: checkpoint {path} not written")
        state = self.checkpoint_state(phase, data_state)
        if self.fsdp:
            self._save_fsdp(path, state)
        elif self.dist.is_master:
            atomic_save(model_checkpoint(self.raw_model, self.model_args, **state), path)
        self.dist.barrier()

    def _save_fsdp(self, path, state):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        shards = Path(str(path) + ".dcp")
        tmp = Path(str(shards) + ".tmp")
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

    def check_shape(self, ckpt, path):
        """The checkpoint's model must have this model's shape (dropout may differ)."""
        mine, theirs = asdict(self.model_args), dict(ckpt["model_args"])
        mine.pop("dropout"), theirs.pop("dropout", None)
        if mine != theirs:
            raise ValueError(f"{path}: model arguments differ from the config:\n  checkpoint {theirs}\n  config     {mine}")

    def load(self, path):
        """Restore weights, optimizer, scaler, step and RNG; returns the checkpoint dict."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.check_shape(ckpt, path)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(Path(path).parent / ckpt["sharded"]))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            set_rng_state(ckpt["rng"][self.dist.rank])
        else:
            self.raw_model.load_state_dict(ckpt["model"], strict=True)
            if ckpt.get("optimizer") is None:
                raise ValueError(f"{path} holds no optimizer state to resume from (an FSDP2 checkpoint? resume with parallel=fsdp)")
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
        peak = cfg.get("peak_flops") or PEAK_FLOPS.get(self.device.type, PEAK_FLOPS["cpu"])
        flops_per_token = self.raw_model.flops_per_token(seq_len)

        def make(step):
            batches = data.train_batches(step, micro, batch_size, d.rank, d.world)
            return batches, data.state_dict()

        prefetch = Prefetcher(make, first_step, last_step)
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
