"""Vision-language training (vlm.py), two stages on the shared trainer:

    python vlm_train.py config/vlm_align.py        # stage 1: the projector learns captions (LLM and tower frozen)
    python vlm_train.py config/vlm_instruct.py     # stage 2: projector + LLM on visual instructions
    torchrun --standalone --nproc_per_node=8 vlm_train.py config/vlm_instruct.py
    python vlm_train.py config/vlm_instruct.py --init_from=resume
    python vlm_train.py config/vlm_instruct.py --lora_rank=8   # instruct with LoRA on the LLM (lora.py)

align: init_from is a text checkpoint (SFT or pretraining) that gives the LLM; vision_tower is a local
transformers folder (README: "Vision-language model"); the projector starts fresh. instruct: init_from is the
align checkpoint, whose arguments (tower, projector, image tokens) it keeps. The tower is always frozen.
Frozen weights get no gradients and no optimizer state. Checkpoints (out_dir/ckpt.pt) hold the whole model,
tower included, so chat.py, eval.py and export_hf.py need nothing else.

instruct with lora_rank > 0: the LLM is frozen and gets LoRA adapters (lora.py); the projector trains as
before. Checkpoints then hold the projector and the adapters and name the align checkpoint they build on;
the run ends by writing out_dir/adapter/ (the LLM's adapters in PEFT's format) and out_dir/merged.pt, the
whole model with the adapters folded in, which chat.py and eval.py read.
"""

import sys
from pathlib import Path

import torch

import lora
from chatglm_tokenizer import load_tokenizer
from checkpoint import CheckpointError, atomic_save, check_tokenizer, checkpoint_meta, claim_run, model_checkpoint
from configurator import configure, overrides
from corpora import parse_source
from dataset_vlm import VLMData
from lora import LoRAConfig
from parallel import Dist
from plot import plot_runs
from runlog import LogError, RunLog, read_log
from trainer import NonFiniteLoss, TrainConfig, Trainer, check_config, epoch_schedule
from vlm import VLM, VLMArgs, build_vlm, is_vlm_checkpoint, set_trainable

SHARED = (TrainConfig, LoRAConfig)  # the keys it shares with the other training scripts

# ---- the VLM's own keys
out_dir = "out/vlm/align"
stage = "align"  # align: the projector, on captions; instruct: projector + LLM, on visual instructions
init_from = "out/sft/ckpt.pt"  # align: a text checkpoint; instruct: the align checkpoint; "resume": this run's
vision_tower = "data/models/clip-vit-base-patch16"  # align: a local transformers folder (CLIP, Chinese-CLIP, SigLIP)
# ---- data: corpora.py image formats (llava, minimind_v, slake, pmc_vqa, vqa_rad) as NAME=PATH_OR_GLOB
sources = ["llava=data/raw/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"]
image_folders = {}  # NAME -> the folder its image paths are relative to; default: per format, beside the data file
plain_prompts = True  # LLaVA's "plain" template: a prompt keeps its images only (align on captions)
pack = False
epochs = 1.0
max_iters = 0  # 0: epochs over the training rows
# ---- architecture (align only; instruct keeps its checkpoint's)
feature_layer = -2  # the tower layer whose hidden states feed the projector
feature_select = ""  # "default" drops the CLS token, "full" keeps it; "": default for CLIP towers, full for SigLIP
projector_pool = 1  # 2: 2x2 average pooling of the patch grid (196 -> 49 tokens for a 224 px, patch-16 tower)
# ---- the keys every training script shares (trainer.TrainConfig) that the VLM sets otherwise
grad_accum = 2
warmup_iters = 30
decay_shape = "cosine"
weight_decay = 0.0
val_fraction = 0.02
eval_interval = 200
save_interval = 500


def build_model(cfg, tok, start):
    """The model and the checkpoint the trainer loads into it (None: weights are already in place)."""
    if cfg["stage"] == "align" and not is_vlm_checkpoint(start[1]):
        return build_vlm(
            start[0],
            cfg["vision_tower"],
            tok,
            cfg["feature_layer"],
            cfg["feature_select"],
            cfg["projector_pool"],
            cfg["dropout"],
        ), None
    if not is_vlm_checkpoint(start[1]):
        raise SystemExit(f"{start[0]} is a text checkpoint: the instruct stage starts from the align checkpoint")
    return VLM(VLMArgs(**{**start[1]["model_args"], "dropout": cfg["dropout"]})), start[0]


def main(argv):
    cfg = configure(globals(), argv, SHARED)
    check_config(cfg)
    if cfg["stage"] not in ("align", "instruct"):
        raise SystemExit(f"config: stage must be align or instruct, not {cfg['stage']!r}")
    settings = lora.settings_from(cfg)
    if settings and cfg["stage"] != "instruct":
        raise SystemExit("config: LoRA is for the instruct stage (align trains the projector alone)")
    try:
        train(cfg, settings)
    except (CheckpointError, LogError, OSError, NonFiniteLoss) as err:
        raise SystemExit(f"vlm_train.py: {err}") from None


def train(cfg, settings):
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    out = Path(cfg["out_dir"])
    resume = cfg["init_from"] == "resume"
    source = out / "ckpt.pt" if resume else Path(cfg["init_from"])
    start = checkpoint_meta(source)
    run_id = claim_run(out, resume, source, start, cfg["overwrite"], "vlm_train.py", d)
    check_tokenizer(start, source, tok, cfg["tokenizer"])
    torch.manual_seed(cfg["seed"])  # the fresh projector
    try:
        model, weights = build_model(cfg, tok, (source, start))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"vlm_train.py: {err}") from None
    set_trainable(model, cfg["stage"])
    meta = lora.prepare(model, settings, source, start, resume)
    trained_dtype = start.get("dtype_trained") if resume else None
    trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=bool(settings))
    if weights is not None and not settings and not resume:  # LoRA: lora.prepare loaded the base
        trainer.load_weights(weights)
    args = model.args
    sources = [parse_source(spec) for spec in cfg["sources"]]
    data = VLMData(
        sources,
        tok,
        args.max_seq_len,
        args.image_tokens,
        args.image_token_id,
        args.preprocess,
        cfg["seed"],
        cfg["val_fraction"],
        cfg["plain_prompts"],
        cfg["pack"],
        cfg["image_folders"],
    )
    if resume:
        trainer.resume(source, data)
    total, lr_at, plan = epoch_schedule(cfg, len(data.epoch(0)), d.world)

    log = RunLog(out / "log.jsonl", d.is_master, cfg["tensorboard"])
    if d.is_master:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print("config overrides: " + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals(), SHARED).items()))
        print(
            f"{cfg['stage']} from {source}: {model.num_params() / 1e6:.2f}M parameters, {trained / 1e6:.2f}M "
            f"trained{lora.describe(settings)}; {args.image_tokens} tokens per image ({args.vision['model_type']}, "
            f"layer {args.feature_layer}, {args.feature_select}, pool {args.projector_pool}); world {d.world} on "
            f"{d.device}, dtype {trainer.precision}"
        )
        print(f"data: {data.describe()}; {plan}")
        if data.problems.total:
            print(data.problems.summary())
    last = min(total, cfg["stop_at"]) if cfg["stop_at"] else total
    trainer.run(data, trainer.step, last, lr_at, log, out / "ckpt.pt", phase=cfg["stage"], desc=cfg["stage"])
    if d.is_master:
        plot_runs({cfg["stage"]: read_log(log.path)}, out / "loss.png", title=f"VLM {cfg['stage']}: {out}")
        if data.problems.total:
            print(data.problems.summary())
        if settings:
            print(f"adapter: {lora.save_run_adapter(model, meta, out, cfg['stage'], trainer.step, tok.fingerprint)}")
            lora.merge(model.llm)
            merged = {"phase": cfg["stage"], "step": trainer.step, "run_id": run_id, "merged_from": meta["base"]}
            atomic_save(
                model_checkpoint(model, args, tokenizer_fingerprint=tok.fingerprint, **merged), out / "merged.pt"
            )
            print(f"merged (adapters folded in; chat.py, eval.py): {out / 'merged.pt'}")
        print(f"saved {out / 'ckpt.pt'}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
