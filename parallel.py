"""Data parallelism for the trainer: where a process runs (Dist), and how a model is spread over the
processes (Parallel: DDP, FSDP2, or one process). Everything that differs between DDP and FSDP2 is here:
wrapping, skipping the gradient sync on accumulation micro-steps, and saving and restoring state.

DDP keeps the whole model and optimizer on every rank; a checkpoint is one file written by rank 0. FSDP2
(`fully_shard` per block, then the root) shards weights, gradients and optimizer state; its checkpoint is
a torch.distributed.checkpoint folder of shards, `<name>.dcp-<step>/`, plus the `<name>` file that every
reader loads (the full weights gathered for inference, every rank's RNG, and the folder's name).
"""

import contextlib
import datetime
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import CheckpointError, atomic_save, load_weights, model_checkpoint, set_rng_state


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

    def from_master(self, work):
        """work() run on rank 0 only, its result on every rank. When it raises, rank 0 raises that error (its
        script prints the one line) and the other ranks exit with status 1 quietly, instead of each dying in
        the broadcast with a "connection closed by peer" traceback."""
        if not self.enabled:
            return work()
        value, failure = None, None
        if self.is_master:
            try:
                value = work()
            except BaseException as err:  # SystemExit too: the line is rank 0's to print
                failure = err
        value, failed = self.broadcast((value, failure is not None))
        if failure is not None:
            raise failure
        if failed:
            raise SystemExit(1)
        return value

    def all_gather(self, value):
        """[every rank's value] (picklable objects)."""
        if not self.enabled:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.barrier()  # an FSDP2 + checkpoint run aborted at exit without it
            dist.destroy_process_group()


class Parallel:
    """`model` spread over the ranks of `dist_ctx`: kind "fsdp" (FSDP2, mixed precision in `param_dtype`) or
    "ddp"; one process gets the model as it is. `.model` is what to call, `.raw` what checkpoints hold:
    all its weights, or with trained_only those that train (LoRA's adapters; DDP or one process)."""

    def __init__(self, model, kind, dist_ctx, param_dtype=None, trained_only=False):
        self.raw, self.dist, self.trained_only = model, dist_ctx, trained_only
        self.fsdp = kind == "fsdp" and dist_ctx.enabled
        device = dist_ctx.device
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (dist_ctx.world,))  # explicit mesh: gloo needs it
            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            self.model = model
        elif dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = model

    def sync(self, last_micro_step):
        """The context of one micro-step's backward: gradients are reduced over ranks only on the last
        micro-step of an optimizer step (DDP: no all-reduce before; FSDP2: no reduce-scatter)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last_micro_step)
            return contextlib.nullcontext()
        if self.dist.enabled and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # ---- checkpoints
    def save(self, path, optimizer, meta, step):
        """Write the checkpoint at `path` (atomically) with `meta` (step, phase, RNG, config ...). The caller
        turns an OSError into a stop on every rank."""
        path = Path(path)
        if not self.fsdp:
            if self.dist.is_master:
                state = model_checkpoint(self.raw, self.raw.args, self.trained_only, optimizer=optimizer.state_dict())
                atomic_save(state | meta, path)
            return
        self._save_shards(path, optimizer, meta, step)

    def _save_shards(self, path, optimizer, meta, step):
        """The shard folder is written under a new name per step, then the checkpoint file (renamed into place
        last) points to it: a kill at any moment leaves the file naming a complete folder. Older folders of
        the same checkpoint are removed after."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        shards = path.with_name(f"{path.name}.dcp-{step:09d}")
        tmp = shards.with_name(shards.name + ".tmp")
        if self.dist.is_master and tmp.exists():
            shutil.rmtree(tmp)
        self.dist.barrier()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        rngs = self.dist.all_gather(meta["rng"])  # every rank's: dropout masks differ per rank
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.dist.barrier()
        if self.dist.is_master:
            if shards.exists():
                shutil.rmtree(shards)
            os.replace(tmp, shards)
            atomic_save(
                {
                    **model_checkpoint(self.raw, self.raw.args, **meta),
                    "model": full,
                    "rng": rngs,
                    "optimizer": None,
                    "sharded": shards.name,
                },
                path,
            )
            for old in path.parent.glob(f"{path.name}.dcp*"):
                if old.name != shards.name and old.is_dir():
                    shutil.rmtree(old)

    def load(self, path, ckpt, optimizer):
        """Restore weights, optimizer state and this rank's RNG from checkpoint `ckpt` (read from `path`)."""
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_state_dict,
                set_state_dict,
            )

            name = str(ckpt.get("sharded") or "")
            if Path(name).name != name or not name.startswith(Path(path).name + ".dcp"):
                raise CheckpointError(f"{path} names its shards {name!r}, not a folder beside it: refused")
            model_sd, optim_sd = get_state_dict(self.model, optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(Path(path).parent / name))
            set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            set_rng_state(ckpt["rng"][self.dist.rank])
            return
        load_weights(self.raw, ckpt["model"], path, self.trained_only)
        if ckpt.get("optimizer") is None:
            raise CheckpointError(
                f"{path} holds no optimizer state to resume from (an FSDP2 checkpoint? resume with parallel=fsdp)"
            )
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"] if isinstance(ckpt["rng"], dict) else ckpt["rng"][self.dist.rank])

    def load_weights(self, ckpt):
        """Only the weights of checkpoint `ckpt` (another run's: a previous phase, pretraining for SFT)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(self.model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        else:
            self.raw.load_state_dict(ckpt["model"], strict=True)
