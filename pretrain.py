"""Staged pretraining, MiniCPM-style: one command runs every phase of the plan below.

    python pretrain.py config/pretrain_tiny.py                            # 1 CPU or GPU
    torchrun --standalone --nproc_per_node=8 pretrain.py config/pretrain_100m.py
    python pretrain.py config/pretrain_100m.py --init_from=resume         # continue where it stopped

The phases share one WSD learning-rate schedule over their global steps: warmup, then the stable
learning rate through every phase without `decay`, then the decay over the phases marked `decay`.
Each phase saves out_dir/<phase>/ckpt.pt; the last phase before the decay holds the pre-decay
checkpoint, from which a run can be trained longer and decayed again (README: "Continue and decay again").
"""

import json
import sys
from pathlib import Path

from chatglm_tokenizer import load_tokenizer
from configurator import configure, overrides
from dataset import PretrainData
from model import ModelArgs, Transformer
from plot import plot_runs, read_log
from trainer import Dist, Trainer, wsd_lr

# ---- I/O
out_dir = "out/pretrain"
data_dir = "data/processed"  # data_process.py --out: one folder of *.bin shards per source
tokenizer = "chatglm_tokenizer"
init_from = "scratch"  # "scratch", "resume" (latest checkpoint in out_dir), or a checkpoint path
start_phase = ""  # start at this phase (from init_from, else from the previous phase's checkpoint)
stop_at = 0  # stop (with a checkpoint) after this global step, e.g. for a cluster's job time limit; 0: never
# ---- model (vocab_size 0: the tokenizer's)
vocab_size = 0
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 0  # 0: n_heads (no grouping)
hidden_dim = 0  # 0: 8/3 * dim rounded up to multiple_of
multiple_of = 64
max_seq_len = 512
rope_theta = 10000.0
dropout = 0.0
# ---- the phase plan: the seed's four stages; mixture weights are normalised per phase
phases = [
    {"name": "general", "iters": 6000, "mixture": {"wiki": 1, "baike": 1, "c4_zh": 1, "wudao": 2, "skypile": 2}},
    {"name": "refined", "iters": 3000, "mixture": {"wiki": 1, "baike": 1, "medical_pretrain": 0.5}},
    # MiniCPM anneals with high-quality data mixed INTO the general mixture, not instead of it
    {"name": "anneal", "iters": 800, "decay": True,
     "mixture": {"wiki": 1, "baike": 1, "medical_pretrain": 1, "cmedqa2": 0.5, "chatmed_tcm": 0.3, "medical_dialogue": 0.3}},
    {"name": "clinical", "iters": 400, "decay": True,
     "mixture": {"guidelines": 1, "medical_pretrain": 1, "cmekg": 0.3, "wiki": 0.5}},
]
# ---- optimisation (batch_size per rank per micro-step; tokens/step = batch_size*grad_accum*world*max_seq_len)
batch_size = 16
grad_accum = 4
learning_rate = 1e-3
min_lr_ratio = 0.0  # the decay ends at learning_rate * min_lr_ratio
warmup_iters = 500
decay_shape = "1-sqrt"  # exp (MiniCPM), linear, 1-sqrt, cosine
decay_half_life = 0  # exp only; 0: chosen so the decay reaches min_lr_ratio (or 1e-3) at the end
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# ---- runtime
device = "auto"  # auto, cpu, cuda
dtype = "auto"  # auto: bf16 where this machine runs it faster than fp32 (precision.py), else fp32; or as named
compile = False
parallel = "ddp"  # ddp, or fsdp (FSDP2 fully_shard: for models that outgrow one GPU)
fused_adamw = True
seed = 1337
sampling = "random"  # random windows, or sequential (cursors are checkpointed)
val_fraction = 0.01  # tail of every shard held out
eval_interval = 500
eval_windows = 64  # per source
log_interval = 10
save_interval = 1000
nan_policy = "stop"  # stop, or skip (drop the update; at most max_nan_skips in a row)
max_nan_skips = 10
peak_flops = 0.0  # the MFU denominator; 0: H100/H200 dense bf16 on a GPU, this CPU's measured matmul peak in dtype
progress = True
tensorboard = True


def phase_ranges(plan):
    """[(phase dict, first global step, end step)]: the phases laid end to end."""
    out, step = [], 0
    for p in plan:
        out.append((p, step, step + int(p["iters"])))
        step += int(p["iters"])
    return out


def find_resume(cfg, ranges):
    """The latest checkpoint under out_dir: (path, index of the phase to run next)."""
    latest = None
    for i, (p, _, _) in enumerate(ranges):
        path = Path(cfg["out_dir"]) / p["name"] / "ckpt.pt"
        if path.is_file():
            latest = (path, i)
    return latest


def main(argv):
    cfg = configure(globals(), argv)
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    names = [p["name"] for p in cfg["phases"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"phase names must be unique: {names}")
    if cfg["start_phase"] and cfg["start_phase"] not in names:
        raise SystemExit(f"start_phase {cfg['start_phase']!r} is not a phase: {names}")
    ranges = phase_ranges(cfg["phases"])
    total = ranges[-1][2]
    decaying = [first for p, first, _ in ranges if p.get("decay")]
    decay_start = decaying[0] if decaying else total

    def lr_at(step):
        return wsd_lr(step, cfg["learning_rate"], cfg["warmup_iters"], decay_start, total, cfg["decay_shape"],
                      cfg["min_lr_ratio"], cfg["decay_half_life"] or None)

    args = ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"] or None,
                     vocab_size=cfg["vocab_size"] or tok.vocab_size, hidden_dim=cfg["hidden_dim"] or None,
                     multiple_of=cfg["multiple_of"], max_seq_len=cfg["max_seq_len"], rope_theta=cfg["rope_theta"],
                     dropout=cfg["dropout"])
    if args.vocab_size < tok.vocab_size:
        raise SystemExit(f"vocab_size {args.vocab_size} < the tokenizer's {tok.vocab_size}")
    import torch

    torch.manual_seed(cfg["seed"])
    model = Transformer(args)
    trainer = Trainer(model, cfg, d, tok.fingerprint)
    out = Path(cfg["out_dir"])
    log_path = out / "log.jsonl"
    if d.is_master:
        out.mkdir(parents=True, exist_ok=True)
        print("config overrides: " + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals()).items()))
        print(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(True) / 1e6:.2f}M non-embedding), "
              f"world {d.world} on {d.device}, dtype {trainer.precision}, "
              f"{cfg['batch_size'] * cfg['grad_accum'] * d.world * args.max_seq_len:,} tokens/step")
        print(f"schedule: {total} steps, warmup {cfg['warmup_iters']}, decay ({cfg['decay_shape']}) from step {decay_start}")

    first_phase, data_state = 0, None
    if cfg["init_from"] == "resume":
        found = find_resume(cfg, ranges)
        if found is None:
            raise SystemExit(f"init_from=resume: no checkpoint under {out}/<phase>/ckpt.pt")
        ckpt = trainer.load(found[0])
        first_phase = found[1] if trainer.step < ranges[found[1]][2] else found[1] + 1
        data_state = ckpt.get("data_state") if first_phase == found[1] else None
    else:
        first_phase = names.index(cfg["start_phase"]) if cfg["start_phase"] else 0
        source = cfg["init_from"] if cfg["init_from"] != "scratch" else None
        if source is None and first_phase > 0:
            source = out / names[first_phase - 1] / "ckpt.pt"
        if source is not None:
            ckpt = trainer.load(source)  # weights and optimizer: the run continues from there
            same_phase = ckpt.get("phase") == names[first_phase] and trainer.step < ranges[first_phase][2]
            if not same_phase:
                trainer.step = ranges[first_phase][1]
            data_state = ckpt.get("data_state") if same_phase else None
            if d.is_master:
                print(f"starting phase {names[first_phase]} at step {trainer.step} from {source}")
    if first_phase >= len(ranges):
        if d.is_master:
            print(f"all phases already done ({out}); nothing to train")
        d.close()
        return
    if d.is_master and log_path.exists():  # drop log lines of steps a resume will redo
        kept = [r for r in read_log(log_path) if r["step"] <= trainer.step and r.get("event") != "start" or r["step"] < trainer.step]
        log_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    for i in range(first_phase, len(ranges)):
        phase, first, end = ranges[i]
        if cfg["stop_at"]:
            if trainer.step >= cfg["stop_at"]:
                break
            end = min(end, cfg["stop_at"])
        data = PretrainData(cfg["data_dir"], phase["mixture"], args.max_seq_len, cfg["seed"], i, cfg["val_fraction"],
                            cfg["sampling"], tok.fingerprint)
        data.load_state_dict(data_state)
        data_state = None
        if d.is_master:
            print(f"phase {i + 1}/{len(ranges)} {phase['name']}: steps {max(first, trainer.step)}..{end}, {data.describe()}")
        trainer.run(data, max(first, trainer.step), end, lr_at, log_path, out / phase["name"] / "ckpt.pt",
                    phase=phase["name"], data_weights=dict(zip(data.names, data.weights)),
                    desc=f"{i + 1}/{len(ranges)} {phase['name']}")
        if d.is_master:
            plot_runs({"pretrain": read_log(log_path)}, out / "loss.png", title=f"pretraining: {out}")
            note = " (pre-decay checkpoint)" if end == decay_start else ""
            done = "done" if end == ranges[i][2] else f"stopped at step {end} (stop_at); continue with --init_from=resume"
            print(f"phase {phase['name']} {done}: {out / phase['name'] / 'ckpt.pt'}{note}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
