"""Supervised fine-tuning on sft_data_process.py's CSV, loss on answer tokens only (dataset_sft.py).

    python sft.py config/sft_tiny.py
    torchrun --standalone --nproc_per_node=8 sft.py --sft_csv=data/sft/sft_data.csv
    python sft.py --init_from=resume                     # continue this run

Starts from a pretraining checkpoint: init_from, or by default the latest phase's under pretrain_dir.
The model's shape comes from that checkpoint; the loop is trainer.py's, the same as pretraining's.
"""

import sys
from pathlib import Path

import torch

from chatglm_tokenizer import load_tokenizer
from checkpoint import load_checkpoint
from configurator import configure, overrides
from dataset_sft import SFTData
from model import ModelArgs, Transformer
from plot import plot_runs, read_log
from trainer import Dist, Trainer, wsd_lr

# ---- I/O
out_dir = "out/sft"
sft_csv = "data/sft/sft_data.csv"
tokenizer = "chatglm_tokenizer"
pretrain_dir = "out/pretrain"
init_from = ""  # a checkpoint; "": the latest phase's ckpt.pt under pretrain_dir; "resume": this run's
# ---- data
pack = False  # several conversations per row (throughput; see dataset_sft.py)
val_fraction = 0.02
dropout = 0.0  # replaces the pretrained model's dropout
# ---- optimisation (batch_size per rank per micro-step)
epochs = 2.0
max_iters = 0  # 0: epochs over the training rows
batch_size = 16
grad_accum = 2
learning_rate = 1e-4
min_lr_ratio = 0.1
warmup_iters = 50
decay_shape = "cosine"  # after warmup, decay over the whole run
decay_half_life = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# ---- runtime
device = "auto"
dtype = "auto"  # see pretrain.py
compile = False  # SFT rows change length per batch: compiling would recompile often
parallel = "ddp"
fused_adamw = True
seed = 1337
eval_interval = 200
eval_windows = 64  # validation conversations per source
log_interval = 10
save_interval = 500
nan_policy = "stop"
max_nan_skips = 10
peak_flops = 0.0
progress = True
tensorboard = True


def latest_pretrain_checkpoint(pretrain_dir):
    """The pretraining checkpoint with the highest step: the last phase that ran."""
    found = [(load_checkpoint(p)["step"], p) for p in Path(pretrain_dir).glob("*/ckpt.pt")]
    if not found:
        raise SystemExit(f"no pretraining checkpoint under {pretrain_dir}/<phase>/ckpt.pt: run pretrain.py, or set init_from")
    return max(found)[1]


def main(argv):
    cfg = configure(globals(), argv)
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    out = Path(cfg["out_dir"])
    resume = cfg["init_from"] == "resume"
    source = out / "ckpt.pt" if resume else Path(cfg["init_from"] or latest_pretrain_checkpoint(cfg["pretrain_dir"]))
    start = load_checkpoint(source)
    args = ModelArgs(**{**start["model_args"], "dropout": cfg["dropout"]})
    if start.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise SystemExit(f"{source} was trained with another tokenizer than {cfg['tokenizer']}")
    torch.manual_seed(cfg["seed"])
    model = Transformer(args)
    trainer = Trainer(model, cfg, d, tok.fingerprint)
    data = SFTData(cfg["sft_csv"], tok, args.max_seq_len, cfg["seed"], cfg["val_fraction"], cfg["pack"])
    rows_per_step = cfg["batch_size"] * cfg["grad_accum"] * d.world
    rows_per_epoch = len(data.epoch(0))
    total = cfg["max_iters"] or max(1, int(cfg["epochs"] * rows_per_epoch / rows_per_step))

    def lr_at(step):
        return wsd_lr(step, cfg["learning_rate"], cfg["warmup_iters"], cfg["warmup_iters"], total, cfg["decay_shape"],
                      cfg["min_lr_ratio"], cfg["decay_half_life"] or None)

    if resume:
        trainer.load(source)
    else:
        trainer.load_weights(source)
    log_path = out / "log.jsonl"
    if d.is_master:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and log_path.exists():
            log_path.unlink()
        print("config overrides: " + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals()).items()))
        print(f"SFT from {source}: {model.num_params() / 1e6:.2f}M parameters, world {d.world} on {d.device}, "
              f"dtype {trainer.precision}")
        print(f"data: {data.describe()}; {total} steps of {rows_per_step} rows ({total * rows_per_step / rows_per_epoch:.2f} epochs)")
    trainer.run(data, trainer.step, total, lr_at, log_path, out / "ckpt.pt", phase="sft", desc="sft")
    if d.is_master:
        plot_runs({"sft": read_log(log_path)}, out / "loss.png", title=f"SFT: {out}")
        print(f"saved {out / 'ckpt.pt'}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
