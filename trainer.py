"""The one training loop, shared by pretrain.py, sft.py and vlm_train.py, and the training keys they share
(TrainConfig). It knows nothing about which data it gets: anything with
train_batches(step, micro_steps, batch_size, rank, world) and val_batches(batch_size, max_windows, rank, world)
will do (dataset.PretrainData, dataset_sft.SFTData, dataset_vlm.VLMData). A batch is (x, y) or (x, y, extras):
extras is a dict of tensors passed on as model(x, y, reduction="sum", **extras) (a VLM's images).

The model returns its loss summed over the batch's units: target tokens, unless it counts its own with
units(y) and names them `unit` (dpo.DPOModel: preference pairs). A model that names `metrics` returns
(loss, {metric: sum over the same units}) instead (reward accuracy ...): the log holds their means per unit.

What it does: autocast in the precision precision.py picks, gradient accumulation that syncs only on the last
micro-step, a loss normalised by the global number of target tokens (so 2 ranks x batch 4 == 1 rank x batch 8
== accumulation 2 x batch 4), the WSD learning-rate schedule, fused AdamW, clipping, a NaN guard, evaluation,
checkpoints that resume bit-exactly (written through parallel.py and checkpoint.py), and logs (runlog.py).
"""

import math
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, check_model_args, load_checkpoint, rng_state
from lm_head import IGNORE_INDEX, LOSS_PATHS, TiedEmbeddingHead
from parallel import Parallel
from precision import (
    CHOICES,
    CUDA_PEAK_FLOPS,
    Precision,
    autocast,
    matmul_peak,
    resolve,
)

DECAY_SHAPES = ("exp", "linear", "1-sqrt", "cosine")


# ---------------------------------------------------------------------------- the shared config
@dataclass
class TrainConfig:
    """The keys every training script has, with their defaults. A script's module constants set its own keys
    and any of these it wants otherwise (configurator.configure(globals(), argv, TrainConfig))."""

    # ---- I/O
    out_dir: str = "out/run"
    tokenizer: str = "chatglm_tokenizer"
    init_from: str = ""  # "": a new run; "resume": this out_dir's run; or a checkpoint to start from
    overwrite: bool = False  # a new run in an out_dir that holds one: True moves the earlier run aside
    stop_at: int = 0  # stop (with a checkpoint) after this global step, e.g. for a job time limit; 0: never
    # ---- optimisation (batch_size per rank per micro-step)
    batch_size: int = 16
    grad_accum: int = 4
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    warmup_iters: int = 500
    decay_shape: str = "1-sqrt"  # exp (MiniCPM), linear, 1-sqrt, cosine
    decay_half_life: int = 0  # exp only; 0: chosen so the decay reaches min_lr_ratio (or 1e-3) at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    dropout: float = 0.0
    # ---- runtime
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto: bf16 where this machine runs it faster than fp32 (precision.py); or as named
    compile: bool = False
    parallel: str = "ddp"  # ddp, or fsdp (FSDP2 fully_shard: for models that outgrow one GPU)
    fused_adamw: bool = True
    lm_loss: str = "chunked"  # chunked, or reference (F.cross_entropy over full logits: lm_head.py)
    seed: int = 1337
    val_fraction: float = 0.01
    eval_interval: int = 500  # 0: no evaluation
    eval_windows: int = 64  # validation windows (or conversations) per source
    log_interval: int = 10
    save_interval: int = 1000  # 0: at the end only
    nan_policy: str = "stop"  # stop, or skip (drop the update; at most max_nan_skips in a row)
    max_nan_skips: int = 10
    peak_flops: float = 0.0  # the MFU denominator; 0: H100/H200 dense bf16 on a GPU, this CPU's matmul peak
    progress: bool = True
    tensorboard: bool = True


def default_config(**overrides):
    """TrainConfig's keys as a config dict, with `overrides`."""
    return {f.name: f.default for f in fields(TrainConfig)} | overrides


def check_config(cfg):
    """Every training key a script has, checked before anything is built or loaded: a bad value stops the
    run at once with one line naming the key, not thousands of steps later (a decay shape is first used
    when the decay starts) or never (grad_accum=0 "trains" on nothing)."""
    rules = {
        "batch_size": (lambda v: v >= 1, ">= 1"),
        "grad_accum": (lambda v: v >= 1, ">= 1"),
        "learning_rate": (lambda v: v > 0, "> 0"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "warmup_iters": (lambda v: v >= 0, ">= 0"),
        "decay_shape": (lambda v: v in DECAY_SHAPES, f"one of {DECAY_SHAPES}"),
        "decay_half_life": (lambda v: v >= 0, ">= 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
        "dtype": (lambda v: v in CHOICES, f"one of {CHOICES}"),
        "parallel": (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
        "lm_loss": (lambda v: v in LOSS_PATHS, LOSS_PATHS),
        "nan_policy": (lambda v: v in ("stop", "skip"), "stop or skip"),
        "max_nan_skips": (lambda v: v >= 0, ">= 0"),
        "eval_interval": (lambda v: v >= 0, ">= 0 (0: no evaluation)"),
        "eval_windows": (lambda v: v >= 1, ">= 1"),
        "log_interval": (lambda v: v >= 1, ">= 1"),
        "save_interval": (lambda v: v >= 0, ">= 0 (0: at the end only)"),
        "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "peak_flops": (lambda v: v >= 0, ">= 0"),
        "stop_at": (lambda v: v >= 0, ">= 0 (0: never)"),
        "epochs": (lambda v: v > 0, "> 0"),
        "max_iters": (lambda v: v >= 0, ">= 0 (0: from epochs)"),
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
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
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
    return (
        x.to(device, non_blocking=True),
        y.to(device, non_blocking=True),
        {k: v.to(device, non_blocking=True) for k, v in extras.items()},
    )


def target_tokens(y):
    return int((y != IGNORE_INDEX).sum())


def epoch_schedule(cfg, per_epoch, world, unit="rows"):
    """Fine-tuning's schedule (SFT, VLM, DPO): `max_iters` steps, else `epochs` passes over `per_epoch`
    items; warmup, then decay from there to the last step (no stable stretch: short runs).
    Returns (total steps, lr_at(step), a line saying how many steps of how many items)."""
    per_step = cfg["batch_size"] * cfg["grad_accum"] * world
    total = cfg["max_iters"] or max(1, int(cfg["epochs"] * per_epoch / per_step))

    def lr_at(step):
        return wsd_lr(
            step,
            cfg["learning_rate"],
            cfg["warmup_iters"],
            cfg["warmup_iters"],
            total,
            cfg["decay_shape"],
            cfg["min_lr_ratio"],
            cfg["decay_half_life"] or None,
        )

    return total, lr_at, f"{total} steps of {per_step} {unit} ({total * per_step / per_epoch:.2f} epochs)"


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(
        self,
        model,
        cfg,
        dist_ctx,
        tokenizer_fingerprint=None,
        run_id=None,
        trained_dtype=None,
        meta=None,
        trained_only=False,
    ):
        """cfg: a config dict with TrainConfig's keys (and the script's own, recorded in checkpoints).
        trained_dtype: the dtype_trained of the checkpoint a resumed run continues from (dtype=auto keeps it).
        meta: more entries for every checkpoint (what the script needs to rebuild the model on resume).
        trained_only: checkpoints hold only the weights that train (a LoRA run's adapters)."""
        self.cfg, self.dist = cfg, dist_ctx
        self.meta = meta or {}
        self.units = getattr(model, "units", target_tokens)  # what the loss is summed over, per batch
        self.unit = getattr(model, "unit", "target_tokens")
        self.metrics = getattr(model, "metrics", ())
        self.step_metrics = {}  # the model's metrics of the last train_step, means per unit
        self.device = dist_ctx.device
        if cfg["dtype"] == "auto" and trained_dtype:  # a run goes on in the precision it started in
            choice = Precision(trained_dtype, "auto: the precision this run was trained in")
        else:
            choice = resolve(cfg["dtype"], self.device, "train", dim=model.args.dim)
        # every rank computes in rank 0's choice, whatever its own probe measured
        self.precision = dist_ctx.broadcast(choice)
        self.dtype = self.precision.dtype
        self.run_id, self.tokenizer_fingerprint = run_id, tokenizer_fingerprint
        for head in (m for m in model.modules() if isinstance(m, TiedEmbeddingHead)):
            head.loss_path = cfg["lm_loss"]
        self.raw_model = model.to(self.device)  # unwrapped: what checkpoints hold
        self.model_args = model.args
        if cfg["compile"]:
            model.compile_for_training()
        self.parallel = Parallel(
            model,
            cfg["parallel"],
            dist_ctx,
            None if self.dtype == "float32" else self.precision.torch_dtype,
            trained_only,
        )
        self.model = self.parallel.model
        self.optimizer = make_optimizer(
            model,
            cfg["learning_rate"],
            cfg["weight_decay"],
            (cfg["beta1"], cfg["beta2"]),
            self.device,
            cfg["fused_adamw"],
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.step = 0

    def loss_and_metrics(self, output):
        """(summed loss, {metric: sum}) of a model's output: (loss, metrics) for a model that names metrics."""
        return output if self.metrics else (output, {})

    # ---- one optimizer step ----
    def train_step(self, batches, lr):
        """Forward/backward over this rank's micro-batches, then clip and step. Returns
        (mean loss over all ranks' units (target tokens), grad norm, units), or raises NonFiniteLoss; the
        model's metrics, means over all ranks' units, are left in self.step_metrics."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_tokens = sum(self.units(batch[1]) for batch in batches)
        tokens = self.dist.all_sum(local_tokens)
        # sum-loss / global unit count, times world because DDP/FSDP average gradients over ranks
        scale = self.dist.world / max(tokens, 1)
        loss_sum, sums = 0.0, dict.fromkeys(self.metrics, 0.0)
        self.model.train()
        for i, batch in enumerate(batches):
            x, y, extras = on_device(batch, self.device)
            with self.parallel.sync(i == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss, metrics = self.loss_and_metrics(self.model(x, y, reduction="sum", **extras))
                self.scaler.scale(loss * scale).backward()
            loss_sum += loss.item()
            for name, value in metrics.items():
                sums[name] += float(value)
        mean_loss = self.dist.all_sum(loss_sum) / max(tokens, 1)
        self.step_metrics = {name: self.dist.all_sum(value) / max(tokens, 1) for name, value in sums.items()}
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
        """{source: mean loss per unit (target token)} on held-out data, plus "val": the weighted mean, and
        "source/metric": the model's metrics, means per unit."""
        self.model.eval()
        losses, sources = {}, []
        for name, batches in data.val_batches(
            self.cfg["batch_size"], self.cfg["eval_windows"], self.dist.rank, self.dist.world
        ).items():
            # FSDP2 ranks must run the same number of forwards (each all-gathers weights): pad with
            # batches whose targets are all ignored, which add nothing to the sum or the count (two rows: a
            # preference pair for DPO)
            missing = int(self.dist.all_sum(len(batches), op="max")) - len(batches)
            filler = torch.zeros(2, self.model_args.max_seq_len, dtype=torch.long)
            batches = list(batches) + [(filler, torch.full_like(filler, IGNORE_INDEX))] * missing
            total, count, sums = 0.0, 0, dict.fromkeys(self.metrics, 0.0)
            for batch in batches:
                x, y, extras = on_device(batch, self.device)
                with autocast(self.device, self.dtype):
                    loss, metrics = self.loss_and_metrics(self.model(x, y, reduction="sum", **extras))
                total += float(loss)
                count += self.units(y)
                for metric, value in metrics.items():
                    sums[metric] += float(value)
            total, count = self.dist.all_sum(total), self.dist.all_sum(count)
            if count:
                losses[name] = total / count
                losses |= {f"{name}/{metric}": self.dist.all_sum(value) / count for metric, value in sums.items()}
                sources.append(name)
        if sources:
            w = weights or {n: 1.0 for n in sources}
            norm = sum(w.get(n, 0) for n in sources) or 1
            losses["val"] = sum(losses[n] * w.get(n, 0) for n in sources) / norm
        return losses

    # ---- checkpoints ----
    def save(self, path, phase, data_state):
        """Write the checkpoint (atomically); a failed write (a full disk) stops every rank with
        CheckpointError, and what was written before is left as it was."""
        for p in self.raw_model.parameters():  # never replace a good checkpoint with a broken model
            if not torch.isfinite(p.detach()).all():
                raise NonFiniteLoss(f"non-finite weights at step {self.step}: checkpoint {path} not written")
        meta = {
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "phase": phase,
            "data_state": data_state,
            "rng": rng_state(),
            "config": self.cfg,
            "run_id": self.run_id,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "dtype_trained": self.dtype,
            "rows_per_step": self.rows_per_step,
            **self.meta,
        }
        error = None
        try:
            self.parallel.save(path, self.optimizer, meta, self.step)
        except OSError as err:
            error = err.strerror or str(err)
        if self.dist.all_sum(error is not None, op="max"):
            raise CheckpointError(
                f"step {self.step}: {error or 'another rank could not write its checkpoint part'}; "
                "nothing was replaced: the checkpoints written before are intact (free disk space, "
                "then --init_from=resume)"
            )
        self.dist.barrier()

    def load(self, path):
        """Restore weights, optimizer, scaler, step and RNG; returns the rest of the checkpoint (phase, data_state,
        rows_per_step, ...), without the weights and optimizer state, which the caller need not keep alive."""
        ckpt = load_checkpoint(path, map_location="cpu")
        check_model_args(ckpt, self.model_args, path)
        self.parallel.load(path, ckpt, self.optimizer)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        return {key: value for key, value in ckpt.items() if key not in ("model", "optimizer")}

    def resume(self, path, data):
        """load(path) for a run that continues mid-schedule on RowBatches data (SFT, DPO, VLM): the same rows a
        step and the same rows (data.load_state_dict), or CheckpointError."""
        resumed = self.load(path)
        self.check_same_batch(resumed, path)
        data.load_state_dict(resumed["data_state"], path)

    @property
    def rows_per_step(self):
        return self.cfg["batch_size"] * self.cfg["grad_accum"] * self.dist.world

    def check_same_batch(self, ckpt, path):
        """A run continued mid-schedule must take as many rows a step as it did: step s's rows are a function of
        s and that number (any world x grad_accum split of it gives the same rows), so another number would
        repeat or skip data and change what a step means for the learning-rate schedule."""
        saved = ckpt.get("rows_per_step")
        if saved is None or saved == self.rows_per_step:
            return
        batch_size, world = self.cfg["batch_size"], self.dist.world
        if saved % (batch_size * world) == 0:
            hint = f"--grad_accum={saved // (batch_size * world)}"
        elif saved % world == 0:
            hint = f"--batch_size={saved // world} --grad_accum=1"
        else:
            hint = f"a number of processes that divides {saved}"
        raise CheckpointError(
            f"{path} was trained with {saved} rows a step; this run takes {self.rows_per_step} (batch_size "
            f"{batch_size} x grad_accum {self.cfg['grad_accum']} x {world} process(es)): continue it with "
            f"{saved} ({hint}), or start a new run"
        )

    def load_weights(self, path):
        """Start from another run's weights (a previous phase, or pretraining for SFT): fresh optimizer."""
        ckpt = load_checkpoint(path, map_location="cpu")
        check_model_args(ckpt, self.model_args, path)
        self.parallel.load_weights(ckpt)
        return ckpt

    # ---- the loop ----
    def run(self, data, first_step, last_step, lr_at, log, ckpt_path, phase="train", data_weights=None, desc=None):
        """Train steps [first_step, last_step) on `data`, logging to `log` (a runlog.RunLog) and saving
        `ckpt_path` every save_interval steps and at the end. `lr_at(step)` gives a (global) step's learning rate."""
        cfg, d = self.cfg, self.dist
        self.step = first_step
        micro, batch_size = cfg["grad_accum"], cfg["batch_size"]
        seq_len = self.model_args.max_seq_len
        peak = cfg["peak_flops"] or (
            CUDA_PEAK_FLOPS if self.device.type == "cuda" else matmul_peak(str(self.device), self.dtype)
        )
        flops_per_token = self.raw_model.flops_per_token(seq_len)

        def make(step):
            batches = data.train_batches(step, micro, batch_size, d.rank, d.world)
            return batches, data.state_dict()

        prefetch = Prefetcher(make, first_step, last_step)
        log.resume_at(first_step)
        log.write({"step": first_step, "phase": phase, "event": "start"})  # marks the boundary in plots
        bar = tqdm(
            total=last_step - first_step,
            desc=desc or phase,
            disable=not d.is_master or not cfg["progress"],
            dynamic_ncols=True,
        )
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
                if cfg["nan_policy"] == "stop" or skipped_in_a_row > cfg["max_nan_skips"]:
                    last = (
                        f"the last good checkpoint is {ckpt_path}"
                        if Path(ckpt_path).exists()
                        else "this run has written no checkpoint yet"
                    )
                    raise NonFiniteLoss(
                        message + f"; stopped: {last} (lower learning_rate, or nan_policy=skip)"
                    ) from None
                log.say(message + "; update skipped (nan_policy=skip)")
                log.write({"step": self.step, "phase": phase, "skipped": "non-finite loss", "lr": lr})
                loss = None
            dt = time.perf_counter() - t0
            self.step += 1
            data_state = next_state
            bar.update(1)
            if loss is not None:
                tok_s = sum(batch[1].numel() for batch in batches) * d.world / max(dt, 1e-9)
                record = {
                    "step": self.step,
                    "phase": phase,
                    "loss": loss,
                    **self.step_metrics,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_sec": tok_s,
                    "mfu": tok_s * flops_per_token / peak,
                    self.unit: int(tokens),
                }
                if self.device.type == "cuda":
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.step % cfg["log_interval"] == 0 or self.step == last_step:
                    log.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg["eval_interval"] and (self.step % cfg["eval_interval"] == 0 or self.step == last_step):
                losses = self.evaluate(data, data_weights)
                if losses:
                    log.write({"step": self.step, "phase": phase, **{f"val/{k}": v for k, v in losses.items()}})
                    train = f"train {loss:.4f}, " if loss is not None else ""
                    log.say(
                        f"[{phase}] step {self.step}: {train}val {losses['val']:.4f} "
                        + " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "val" and "/" not in k)
                    )
            if self.step == last_step or (cfg["save_interval"] and self.step % cfg["save_interval"] == 0):
                self.save(ckpt_path, phase, data_state)
        bar.close()
        return losses
