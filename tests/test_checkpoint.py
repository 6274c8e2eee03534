"""checkpoint.py: loading only data (never code), atomic writes that survive a failed write, runs that own
their out_dir."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, atomic_save, load_checkpoint, start_run
from model import ModelArgs, Transformer

from conftest import ROOT


class RunsAShellCommand:
    """What a crafted checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_checkpoint(path, **meta):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    atomic_save(checkpoint.model_checkpoint(model, model.args, step=3, phase="sft", **meta), path)
    return model


def test_a_crafted_checkpoint_runs_nothing_anywhere_a_checkpoint_is_read(tmp_path, tiny_tokenizer_dir):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    torch.save(checkpoint.model_checkpoint(model, model.args, step=1, payload=RunsAShellCommand(marker)), crafted)
    with pytest.raises(CheckpointError, match="would run code when loaded: refused"):
        load_checkpoint(crafted)
    commands = [
        ["chat.py", "--ckpt", str(crafted), "--prompt", "你好", "--tokenizer", str(tiny_tokenizer_dir)],
        [
            "eval.py",
            "ppl",
            "--ckpt",
            str(crafted),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--source",
            f"heldout={ROOT / 'data/sample/heldout'}",
        ],
        ["export_hf.py", "--ckpt", str(crafted), "--out", str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir)],
        [
            "sft.py",
            "config/sft_tiny.py",
            f"--init_from={crafted}",
            f"--out_dir={tmp_path / 'sft'}",
            f"--tokenizer={tiny_tokenizer_dir}",
        ],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and "refused" in result.stderr, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, command
    assert not marker.exists()


def test_truncated_or_junk_checkpoints_are_one_line_errors(tmp_path, tiny_tokenizer_dir):
    good = tmp_path / "good.pt"
    tiny_checkpoint(good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all\n" * 100)
    for name in ("cut.pt", "junk.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
        result = subprocess.run(
            [
                sys.executable,
                "chat.py",
                "--ckpt",
                str(tmp_path / name),
                "--prompt",
                "x",
                "--tokenizer",
                str(tiny_tokenizer_dir),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"{name} is not a readable checkpoint" in result.stderr
    assert load_checkpoint(good)["step"] == 3


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(path)
    before = path.read_bytes()

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")  # the bytes a full disk lets through before failing
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device"):
        atomic_save({"model_args": {}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_kill_between_write_and_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(path)
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt  # what a kill between the write and the rename looks like to the file system

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_checkpoint(path, extra="new")
    assert path.read_bytes() == before  # never written in place
    assert load_checkpoint(path)["step"] == 3


def test_new_run_refuses_a_folder_holding_a_run_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    refused = start_run(out, False, "test")  # a run stopped before its first step leaves only run.json
    first = start_run(out, False, "test")  # so the corrected command may start there
    assert first != refused and checkpoint.run_id_of(out) == first
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match="holds an earlier run.*--init_from=resume.*--overwrite=True"):
        start_run(out, False, "test")
    second = start_run(out, True, "test")
    assert second != first and checkpoint.run_id_of(out) == second
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "run.json").read_text())["run_id"] == first
    assert (aside[0] / "log.jsonl").read_text() == '{"step": 1}\n'
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        start_run(tmp_path / "a_file", True, "test")


def test_latest_means_latest_of_this_run(tmp_path):
    tiny_checkpoint(tmp_path / "a.pt", run_id="mine")
    atomic_save({**load_checkpoint(tmp_path / "a.pt"), "step": 99, "run_id": "an earlier run"}, tmp_path / "b.pt")
    atomic_save({**load_checkpoint(tmp_path / "a.pt"), "step": 7}, tmp_path / "c.pt")
    paths = [tmp_path / n for n in ("a.pt", "b.pt", "c.pt")]
    assert checkpoint.latest_checkpoint(paths, "mine") == (7, str(tmp_path / "c.pt"))
    assert checkpoint.latest_checkpoint(paths, "nobody") is None
