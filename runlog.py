"""A run's log: one JSON record per line in out_dir/log.jsonl, TensorBoard scalars when tensorboard is
installed, and lines on the console; written by rank 0, kept in memory on every rank (`records`).

A record is {"time", "step", "phase", ...}: training ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu",
"target_tokens"), evaluation ("val/<source>", "val/val"), or the start of a phase ("event": "start"), which
marks the phase boundaries in loss.png.
"""

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from checkpoint import atomic_write_text


class LogError(ValueError):
    """A log.jsonl line that is not a record (other than a torn last line)."""


def read_log(path):
    """The records of a JSONL log. A torn last line (a kill in the middle of a write) is left out with a
    note; a bad line before the last is an error naming file:line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a log record")
        except ValueError:
            if i == len(lines) - 1:
                print(
                    f"note: {path}:{number}: the last line is cut short (a run killed while writing): left out",
                    file=sys.stderr,
                )
                break
            raise LogError(f"{path}:{number}: not a JSON log record: fix or delete that line") from None
        records.append(record)
    return records


class RunLog:
    def __init__(self, path, is_master=True, tensorboard=True):
        self.path, self.is_master, self.tensorboard = Path(path), is_master, tensorboard
        self.records = []
        self.tb = None

    def resume_at(self, step):
        """A run that goes on from `step` redoes what came after: drop those records (and the phase-start
        marker at `step`, which the run writes again)."""
        if self.is_master and self.path.exists():
            kept = [
                r for r in read_log(self.path) if r["step"] < step or r["step"] == step and r.get("event") != "start"
            ]
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def write(self, record):
        record = {"time": time.time(), **record}
        self.records.append(record)
        if not self.is_master:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                self.tb = False
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(key, value, record["step"])

    def say(self, text):
        """A line on the console (between progress-bar updates), from rank 0."""
        if self.is_master:
            tqdm.write(text)
