"""Supervised fine-tuning on sft_data_process.py's CSV, loss on answer tokens only (dataset_sft.py).

    python sft.py config/sft_tiny.py
    torchrun --standalone --nproc_per_node=8 sft.py --sft_csv=data/sft/sft_data.csv
    python sft.py --init_from=resume                     # continue this run
    python sft.py config/sft_tiny.py --lora_rank=8       # LoRA: base frozen, adapters trained (lora.py)

Starts from a pretraining checkpoint: init_from, or by default the latest phase's under pretrain_dir.
The model's shape comes from that checkpoint; the loop is trainer.py's, the same as pretraining's.
With lora_rank > 0 the checkpoint's weights stay frozen and only LoRA adapters on lora_targets train:
out_dir/ckpt.pt holds the adapters (and their optimizer state) and names its base checkpoint, and at the end
out_dir/adapter/ is written in PEFT's format (chat.py --adapter, merge_lora.py, PeftModel).
"""

import sys
from pathlib import Path

import torch

import lora
from chatglm_tokenizer import load_tokenizer
from checkpoint import (
    CheckpointError,
    check_tokenizer,
    claim_run,
    latest_checkpoint,
    run_id_of,
    text_model_meta,
)
from configurator import configure, overrides
from dataset_sft import SFTData
from lora import LoRAConfig
from model import ModelArgs, Transformer
from parallel import Dist
from plot import plot_runs
from runlog import LogError, RunLog, read_log
from trainer import NonFiniteLoss, TrainConfig, Trainer, check_config, epoch_schedule

SHARED = (TrainConfig, LoRAConfig)  # the keys it shares with the other training scripts

# ---- SFT's own keys
out_dir = "out/sft"
sft_csv = "data/sft/sft_data.csv"
pretrain_dir = "out/pretrain"  # init_from "": the latest checkpoint of this folder's run
pack = False  # several conversations per row (throughput; see dataset_sft.py)
epochs = 2.0
max_iters = 0  # 0: epochs over the training rows
# ---- the keys every training script shares (trainer.TrainConfig) that SFT sets otherwise
grad_accum = 2
learning_rate = 1e-4
min_lr_ratio = 0.1
warmup_iters = 50
decay_shape = "cosine"  # after warmup, decay over the whole run
weight_decay = 0.0
val_fraction = 0.02
eval_interval = 200
save_interval = 500
# dropout replaces the pretrained model's; compile stays off: SFT rows change length per batch (recompiles)


def latest_pretrain_checkpoint(pretrain_dir):
    """The checkpoint of pretrain_dir's run (its run.json) with the highest step: the last phase that ran."""
    found = latest_checkpoint(sorted(Path(pretrain_dir).glob("*/ckpt.pt")), run_id_of(pretrain_dir))
    if found is None:
        raise SystemExit(
            f"no pretraining checkpoint of the run in {pretrain_dir} (<phase>/ckpt.pt): run pretrain.py, "
            "or set init_from"
        )
    return Path(found[1])


def main(argv):
    cfg = configure(globals(), argv, SHARED)
    check_config(cfg)
    settings = lora.settings_from(cfg)
    try:
        train(cfg, settings)
    except (CheckpointError, LogError, OSError, NonFiniteLoss) as err:
        raise SystemExit(f"sft.py: {err}") from None


def train(cfg, settings):
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    out = Path(cfg["out_dir"])
    resume = cfg["init_from"] == "resume"
    source = out / "ckpt.pt" if resume else Path(cfg["init_from"] or latest_pretrain_checkpoint(cfg["pretrain_dir"]))
    start = text_model_meta(source)
    run_id = claim_run(out, resume, source, start, cfg["overwrite"], "sft.py", d)
    args = ModelArgs(**{**start["model_args"], "dropout": cfg["dropout"]})
    check_tokenizer(start, source, tok, cfg["tokenizer"])
    if tok.vocab_size > args.vocab_size:
        raise SystemExit(f"{cfg['tokenizer']} has {tok.vocab_size} ids but {source}'s model embeds {args.vocab_size}")
    torch.manual_seed(cfg["seed"])
    model = Transformer(args)
    meta = lora.prepare(model, settings, source, start, resume)
    trained_dtype = start.get("dtype_trained") if resume else None
    trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=bool(settings))
    try:
        data = SFTData(cfg["sft_csv"], tok, args.max_seq_len, cfg["seed"], cfg["val_fraction"], cfg["pack"])
    except (FileNotFoundError, ValueError) as err:  # a missing, empty or unusable CSV
        raise SystemExit(f"sft.py: {err}") from None
    total, lr_at, plan = epoch_schedule(cfg, len(data.epoch(0)), d.world)

    if resume:
        trainer.resume(source, data)
    elif not settings:  # LoRA: lora.prepare loaded the base
        trainer.load_weights(source)
    log = RunLog(out / "log.jsonl", d.is_master, cfg["tensorboard"])
    if d.is_master:
        print("config overrides: " + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals(), SHARED).items()))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"SFT from {source}: {model.num_params() / 1e6:.2f}M parameters, {trained / 1e6:.3f}M trained"
            f"{lora.describe(settings)}, world {d.world} on {d.device}, dtype {trainer.precision}"
        )
        print(f"data: {data.describe()}; {plan}")
    end = min(total, cfg["stop_at"]) if cfg["stop_at"] else total
    if trainer.step >= end:
        if d.is_master:
            print(f"SFT already at step {trainer.step} of {end}; nothing to train")
        d.close()
        return
    trainer.run(data, trainer.step, end, lr_at, log, out / "ckpt.pt", phase="sft", desc="sft")
    if d.is_master:
        plot_runs({"sft": read_log(log.path)}, out / "loss.png", title=f"SFT: {out}")
        if settings:
            print(f"adapter: {lora.save_run_adapter(model, meta, out, 'sft', trainer.step, tok.fingerprint)}")
        stopped = "" if end == total else f" (stopped at step {end} of {total}: continue with --init_from=resume)"
        print(f"saved {out / 'ckpt.pt'}{stopped}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
