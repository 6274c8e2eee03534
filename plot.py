"""Loss curves from the trainers' JSONL logs: train and validation loss against step, one colour per
run, a dashed line at every phase boundary.

    python plot.py out/pretrain/log.jsonl out/sft/log.jsonl --out out/loss.png
"""

import argparse
import json
import sys
from pathlib import Path


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
                print(f"note: {path}:{number}: the last line is cut short (a run killed while writing): left out",
                      file=sys.stderr)
                break
            raise LogError(f"{path}:{number}: not a JSON log record: fix or delete that line") from None
        records.append(record)
    return records


def plot_runs(runs, out_path, title="loss"):
    """runs: {label: [log records]}. Later runs continue the x axis of earlier ones (SFT after
    pretraining), so the whole life of a model reads left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    offset = 0
    for label, records in runs.items():
        train = [(r["step"] + offset, r["loss"]) for r in records if "loss" in r]
        val = [(r["step"] + offset, r["val/val"]) for r in records if "val/val" in r]
        if train:
            ax.plot(*zip(*train), label=f"{label} train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label=f"{label} val", markersize=3)
        boundaries, last_phase = [], None
        for r in records:
            if r.get("phase") != last_phase:
                boundaries.append((r["step"] + offset, r.get("phase")))
                last_phase = r.get("phase")
        for x, phase in boundaries:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.text(x, 1.0, f" {phase}", rotation=90, va="top", fontsize=8, transform=ax.get_xaxis_transform())
        offset = max([offset] + [r["step"] + offset for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files, in order")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="loss")
    args = parser.parse_args()
    plot_runs({Path(p).parent.name: read_log(p) for p in args.logs}, args.out, args.title)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
