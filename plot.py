"""Loss curves from the trainers' JSONL logs: train and validation loss against step, one colour per
run, a dashed line at every phase boundary.

    python plot.py out/pretrain/log.jsonl out/sft/log.jsonl --out out/loss.png
"""

import argparse
from pathlib import Path

from atomic import atomic_write
from runlog import read_log


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
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


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
