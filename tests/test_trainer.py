"""trainer.py's promises that equal losses alone cannot show: the all-reduce only on the last micro-step,
the loss divided by the GLOBAL target count when ranks hold different numbers of targets, bit-exact resume
for both samplers, for SFT and across a phase boundary, and the FSDP2 shard folder swap under a kill."""

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain import cli, run_pretrain, train_losses

from checkpoint import atomic_save, model_checkpoint
from lm_head import IGNORE_INDEX
from model import ModelArgs, Transformer

from conftest import ROOT, quiet_config

CFG = quiet_config(batch_size=2, grad_clip=0.0)
ARGS = dict(dim=32, n_layers=2, n_heads=2, vocab_size=300, max_seq_len=16)


class UnevenData:
    """Per-rank batches of one global step: rank 0's rows are full of targets, rank 1's mostly ignored, so a
    loss normalised per rank (instead of by the global count) weighs rank 1's few targets too much."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, ARGS["vocab_size"], (4, 16), generator=g)
        self.y = torch.randint(0, ARGS["vocab_size"], (4, 16), generator=g)
        self.y[2:, 3:] = IGNORE_INDEX  # the second half of the global batch: 3 targets a row

    def rows(self, rank, world):
        per = len(self.x) // world
        return self.x[rank * per : (rank + 1) * per], self.y[rank * per : (rank + 1) * per]


def step_on_ranks(rank, world, init_file, micro_steps, result_file):
    """One optimizer step of a DDP trainer: (loss, grad norm, all-reduce calls) from rank 0."""
    import torch.distributed as dist

    from parallel import Dist
    from trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    torch.manual_seed(0)
    trainer = Trainer(Transformer(ModelArgs(**ARGS)), dict(CFG, grad_accum=micro_steps), Dist("cpu"))
    calls = []
    if world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            allreduce_hook,
        )

        def counting(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting)
    x, y = UnevenData().rows(rank, world)
    batches = [(x[i::micro_steps], y[i::micro_steps]) for i in range(micro_steps)]
    loss, norm, tokens = trainer.train_step(batches, 1e-2)
    if rank == 0:
        Path(result_file).write_text(json.dumps({"loss": loss, "norm": norm, "tokens": tokens, "calls": len(calls)}))
    dist.barrier()
    dist.destroy_process_group()


def spawn_step(world, micro_steps, tmp_path):
    result = tmp_path / f"result_{world}_{micro_steps}.json"
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(step_on_ranks, args=(world, init, micro_steps, str(result)), nprocs=world, join=True)
    return json.loads(result.read_text())


@pytest.mark.slow
def test_ddp_all_reduces_only_on_the_last_micro_step(tmp_path):
    one = spawn_step(2, 1, tmp_path)
    four = spawn_step(2, 2, tmp_path)  # accumulation over 2 micro-steps: the same buckets, reduced once
    assert one["calls"] >= 1 and four["calls"] == one["calls"]


@pytest.mark.slow
def test_ranks_with_different_target_counts_normalise_by_the_global_count(tmp_path):
    """2 ranks of 2 rows (rank 1 with 6 targets against rank 0's 32) == 1 process of the 4 rows."""
    single = spawn_step(1, 1, tmp_path)
    ddp = spawn_step(2, 1, tmp_path)
    assert single["tokens"] == ddp["tokens"] == 38
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert ddp["norm"] == pytest.approx(single["norm"], rel=1e-5)


@pytest.mark.parametrize("sampling,stop_at", [("random", 3), ("sequential", 3), ("sequential", 6), ("sequential", 9)])
def test_resume_is_bit_exact_for_both_samplers_and_across_a_phase_boundary(
    tmp_path, token_dir, tiny_tokenizer_dir, sampling, stop_at
):
    """Phase one ends at step 6: stop_at 3 and 9 resume inside a phase (sequential cursors restored), 6 at
    the boundary (the next phase starts with fresh cursors)."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_pretrain(full, token_dir, tiny_tokenizer_dir, f"--sampling={sampling}", "--dropout=0.1")
    run_pretrain(part, token_dir, tiny_tokenizer_dir, f"--sampling={sampling}", "--dropout=0.1", f"--stop_at={stop_at}")
    with open(part / "log.jsonl", "a", encoding="utf-8") as f:  # logged by a run killed after its last checkpoint
        f.write(json.dumps({"time": 0.0, "step": stop_at + 1, "phase": "one", "loss": 99.0}) + "\n")
    run_pretrain(part, token_dir, tiny_tokenizer_dir, f"--sampling={sampling}", "--dropout=0.1", "--init_from=resume")
    assert train_losses(part) == train_losses(full)


def sft_setup(tmp_path, tok):
    rows = [
        {
            "prompt": f"问题{i}：头痛{i}次怎么办？",
            "answer": f"回答{i}：多休息，喝水{i}杯。",
            "history": "[]",
            "source": "s",
        }
        for i in range(40)
    ]
    with open(tmp_path / "sft.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer", "history", "source"])
        writer.writeheader()
        writer.writerows(rows)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=64))
    atomic_save(
        model_checkpoint(model, model.args, step=10, phase="clinical", tokenizer_fingerprint=tok.fingerprint),
        tmp_path / "pretrained.pt",
    )


def run_sft(tmp_path, out, tokenizer_dir, *extra, init_from=None):
    import sft

    sft.main(
        [
            "config/sft_tiny.py",
            f"--sft_csv={tmp_path / 'sft.csv'}",
            f"--init_from={init_from or tmp_path / 'pretrained.pt'}",
            f"--out_dir={out}",
            f"--tokenizer={tokenizer_dir}",
            "--max_iters=8",
            "--batch_size=4",
            "--dropout=0.1",
            "--eval_interval=4",
            "--log_interval=1",
            "--progress=False",
            "--tensorboard=False",
            "--dtype=float32",
            "--val_fraction=0.1",
            *extra,
        ]
    )


def test_sft_resume_is_bit_exact(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    sft_setup(tmp_path, tiny_tokenizer)
    run_sft(tmp_path, tmp_path / "full", tiny_tokenizer_dir)
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--stop_at=3")
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, init_from="resume")
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert len(full) == 8 and part == full


def test_resume_with_another_number_of_rows_a_step_is_refused(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    sft_setup(tmp_path, tiny_tokenizer)
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--stop_at=3")  # batch 4 x grad_accum 1 x 1 process
    with pytest.raises(
        SystemExit, match=r"trained with 4 rows a step; this run takes 8 .*\(--batch_size=4 --grad_accum=1\)"
    ):
        run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--batch_size=8", init_from="resume")
    with pytest.raises(SystemExit, match=r"trained with 4 rows a step; this run takes 8 .*\(--grad_accum=1\)"):
        run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--grad_accum=2", init_from="resume")
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--batch_size=2", "--grad_accum=2", init_from="resume")
    assert len(train_losses(tmp_path / "part")) == 8  # 2 x 2 rows is the same 4 rows a step: it goes on


def test_sft_resume_on_a_changed_csv_is_refused(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    sft_setup(tmp_path, tiny_tokenizer)
    run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, "--stop_at=3")
    csv_path = tmp_path / "sft.csv"
    csv_path.write_text(
        csv_path.read_text(encoding="utf-8").replace("头痛", "头疼", 1), encoding="utf-8"
    )  # one row edited
    with pytest.raises(SystemExit, match=r"sft.py: .*ckpt.pt was trained on other data"):
        run_sft(tmp_path, tmp_path / "part", tiny_tokenizer_dir, init_from="resume")


KILL_AT_POINTER = """
import os, sys
sys.path.insert(0, {root!r})
real_replace = os.replace

def replace(src, dst):
    # the kill comes after step 12's shard folder is in place, before ckpt.pt is renamed to point at it
    if str(dst).endswith(os.path.join("two", "ckpt.pt")) and os.path.isdir(str(dst) + ".dcp-000000012"):
        os._exit(1)
    return real_replace(src, dst)

os.replace = replace
import pretrain
pretrain.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_fsdp_checkpoint_survives_a_kill_between_shards_and_pointer(tmp_path, token_dir, tiny_tokenizer_dir):
    fsdp = tmp_path / "fsdp"
    cli(fsdp, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", nproc=2)
    expected = train_losses(fsdp)
    killed = tmp_path / "killed"
    cli(killed, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", "--stop_at=9", nproc=2)
    driver = tmp_path / "killed_at_pointer.py"
    driver.write_text(KILL_AT_POINTER.format(root=str(ROOT)))
    from test_pretrain import tiny_args

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(driver),
            *tiny_args(
                killed, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", "--init_from=resume"
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0  # killed
    assert torch.load(killed / "two" / "ckpt.pt", weights_only=True, mmap=True)["step"] == 9
    cli(killed, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", "--init_from=resume", nproc=2)
    np.testing.assert_allclose([loss for _, loss in train_losses(killed)], [loss for _, loss in expected], rtol=1e-6)
