"""Staged pretraining, MiniCPM-style: one command runs every phase of the plan below.

    python pretrain.py config/pretrain_tiny.py                            # 1 CPU or GPU
    torchrun --standalone --nproc_per_node=8 pretrain.py config/pretrain_100m.py
    python pretrain.py config/pretrain_100m.py --init_from=resume         # continue where it stopped

The phases share one WSD learning-rate schedule over their global steps: warmup, then the stable
learning rate through every phase without `decay`, then the decay over the phases marked `decay`.
Each phase saves out_dir/<phase>/ckpt.pt; the last phase before the decay holds the pre-decay
checkpoint, from which a run can be trained longer and decayed again (README: "Continue and decay again").
"""

import re
import sys
from pathlib import Path

from chatglm_tokenizer import load_tokenizer
from checkpoint import (
    CheckpointError,
    checkpoint_meta,
    latest_checkpoint,
    run_id_of,
    start_run,
)
from configurator import configure, overrides
from dataset import DataError, PretrainData
from model import ModelArgs, Transformer
from parallel import Dist
from plot import plot_runs
from runlog import LogError, RunLog, read_log
from trainer import NonFiniteLoss, TrainConfig, Trainer, check_config, wsd_lr

# ---- pretraining's own keys; the keys every training script shares (batch_size, learning_rate, dtype, ...) are
# trainer.TrainConfig's, whose defaults are pretraining's: set any of them here, in a config file or as --key=value
out_dir = "out/pretrain"
data_dir = "data/processed"  # data_process.py --out: one folder of *.bin shards per source
start_phase = ""  # start at this phase (from init_from, else from this run's previous phase's checkpoint)
sampling = "random"  # random windows, or sequential (cursors are checkpointed)
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
# ---- the phase plan: the seed's four stages; mixture weights are normalised per phase
phases = [
    {"name": "general", "iters": 6000, "mixture": {"wiki": 1, "baike": 1, "c4_zh": 1, "wudao": 2, "skypile": 2}},
    {"name": "refined", "iters": 3000, "mixture": {"wiki": 1, "baike": 1, "medical_pretrain": 0.5}},
    # MiniCPM anneals with high-quality data mixed INTO the general mixture, not instead of it
    {
        "name": "anneal",
        "iters": 800,
        "decay": True,
        "mixture": {
            "wiki": 1,
            "baike": 1,
            "medical_pretrain": 1,
            "cmedqa2": 0.5,
            "chatmed_tcm": 0.3,
            "medical_dialogue": 0.3,
        },
    },
    {
        "name": "clinical",
        "iters": 400,
        "decay": True,
        "mixture": {"guidelines": 1, "medical_pretrain": 1, "cmekg": 0.3, "wiki": 0.5},
    },
]
phase_iters = {}  # {phase name: steps}: the plan's phases with these steps instead (a model size's budget)


PHASE_KEYS = {
    "name": "a plain folder name",
    "iters": "steps, an int >= 1",
    "mixture": "{source folder under data_dir: weight >= 0}",
    "decay": "True/False (default False)",
}
PLAIN_NAME = re.compile(r"(?!\.{1,2}$)[\w.-]+")  # a file name that stays in its folder: not '.', '..', no '/'


def check_phases(phases, start_phase, phase_iters):
    """The phase plan, checked whole before step 0: one line naming the phase and the key."""
    if not isinstance(phases, list) or not phases:
        raise SystemExit("config: phases must be a non-empty list of {name, iters, mixture[, decay]} dicts")
    for i, p in enumerate(phases):
        where = f"config: phases[{i}]" + (f" ({p.get('name')!r})" if isinstance(p, dict) and "name" in p else "")
        if not isinstance(p, dict):
            raise SystemExit(f"{where} must be a dict, not {p!r}")
        unknown = sorted(set(p) - set(PHASE_KEYS))
        if unknown:
            raise SystemExit(f"{where}: unknown key(s) {unknown}; a phase has " + ", ".join(PHASE_KEYS))
        missing = [k for k in ("name", "iters", "mixture") if k not in p]
        if missing:
            raise SystemExit(f"{where}: missing {missing}; " + "; ".join(f"{k}: {PHASE_KEYS[k]}" for k in missing))
        if not isinstance(p["name"], str) or not PLAIN_NAME.fullmatch(p["name"]):
            raise SystemExit(f"{where}: name must be {PHASE_KEYS['name']} (letters, digits, '_', '-', '.')")
        if not isinstance(p["iters"], int) or isinstance(p["iters"], bool) or p["iters"] < 1:
            raise SystemExit(f"{where}: iters must be {PHASE_KEYS['iters']}, not {p['iters']!r}")
        if not isinstance(p.get("decay", False), bool):
            raise SystemExit(f"{where}: decay must be True or False, not {p['decay']!r}")
        mixture = p["mixture"]
        if not isinstance(mixture, dict) or not mixture:
            raise SystemExit(f"{where}: mixture must be {PHASE_KEYS['mixture']}, not {mixture!r}")
        for source, weight in mixture.items():
            if not isinstance(source, str) or not PLAIN_NAME.fullmatch(source):
                raise SystemExit(f"{where}: mixture source {source!r} must be a folder name under data_dir")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise SystemExit(f"{where}: mixture weight of {source!r} must be a number >= 0, not {weight!r}")
        if sum(mixture.values()) <= 0:
            raise SystemExit(f"{where}: mixture weights must not all be 0")
    names = [p["name"] for p in phases]
    if len(set(names)) != len(names):
        raise SystemExit(f"config: phase names must be unique: {names}")
    decays = [bool(p.get("decay")) for p in phases]
    if decays != sorted(decays):  # the WSD decay runs from the first decay phase to the end of the plan
        raise SystemExit(f"config: decay phases must come last (the decay runs to the end): {list(zip(names, decays))}")
    if start_phase and start_phase not in names:
        raise SystemExit(f"config: start_phase {start_phase!r} is not a phase: {names}")
    for name, steps in phase_iters.items():
        if name not in names:
            raise SystemExit(f"config: phase_iters names {name!r}, which is not a phase: {names}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SystemExit(f"config: phase_iters[{name!r}] must be steps, an int >= 1, not {steps!r}")


def planned_phases(cfg):
    """The phase plan with phase_iters applied, checked."""
    check_phases(cfg["phases"], cfg["start_phase"], cfg["phase_iters"])
    return [dict(p, iters=cfg["phase_iters"].get(p["name"], p["iters"])) for p in cfg["phases"]]


def phase_ranges(plan):
    """[(phase dict, first global step, end step)]: the phases laid end to end."""
    out, step = [], 0
    for p in plan:
        out.append((p, step, step + p["iters"]))
        step += p["iters"]
    return out


def find_resume(out, ranges, run_id):
    """This run's latest checkpoint under out: (path, index of its phase), or None."""
    paths = {str(out / p["name"] / "ckpt.pt"): i for i, (p, _, _) in enumerate(ranges)}
    latest = latest_checkpoint([path for path in paths if Path(path).is_file()], run_id)
    return None if latest is None else (Path(latest[1]), paths[latest[1]])


def main(argv):
    cfg = configure(globals(), argv, TrainConfig)
    check_config(cfg)
    cfg["phases"] = planned_phases(cfg)
    try:
        train(cfg)
    except (CheckpointError, DataError, LogError, OSError, NonFiniteLoss) as err:
        raise SystemExit(f"pretrain.py: {err}") from None


def train(cfg):
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    names = [p["name"] for p in cfg["phases"]]
    ranges = phase_ranges(cfg["phases"])
    total = ranges[-1][2]
    decaying = [first for p, first, _ in ranges if p.get("decay")]
    decay_start = decaying[0] if decaying else total

    def lr_at(step):
        return wsd_lr(
            step,
            cfg["learning_rate"],
            cfg["warmup_iters"],
            decay_start,
            total,
            cfg["decay_shape"],
            cfg["min_lr_ratio"],
            cfg["decay_half_life"] or None,
        )

    args = ModelArgs(
        dim=cfg["dim"],
        n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"] or None,
        vocab_size=cfg["vocab_size"] or tok.vocab_size,
        hidden_dim=cfg["hidden_dim"] or None,
        multiple_of=cfg["multiple_of"],
        max_seq_len=cfg["max_seq_len"],
        rope_theta=cfg["rope_theta"],
        dropout=cfg["dropout"],
    )
    if args.vocab_size < tok.vocab_size:
        raise SystemExit(f"vocab_size {args.vocab_size} < the tokenizer's {tok.vocab_size}")
    out = Path(cfg["out_dir"])
    # the run in out_dir goes on (resume, or a later phase from this run's previous one) or a new run starts
    from_previous_phase = bool(cfg["start_phase"]) and names.index(cfg["start_phase"]) > 0 and not cfg["init_from"]
    continuing = cfg["init_from"] == "resume" or from_previous_phase
    if continuing:
        run_id = run_id_of(out)
    else:
        run_id = d.from_master(lambda: start_run(out, cfg["overwrite"], "pretrain.py"))
    # the checkpoint this run continues from: its latest (resume), its previous phase's (start_phase), or none
    first_phase = names.index(cfg["start_phase"]) if cfg["start_phase"] else 0
    if cfg["init_from"] == "resume":
        found = find_resume(out, ranges, run_id)
        if found is None:
            raise SystemExit(f"init_from=resume: no checkpoint of the run in {out} under {out}/<phase>/ckpt.pt")
        source, first_phase = found
    elif from_previous_phase:
        source = out / names[first_phase - 1] / "ckpt.pt"
        if checkpoint_meta(source).get("run_id") != run_id:
            raise SystemExit(
                f"{source} belongs to another run than {out}/run.json: pass it as --init_from with a new --out_dir"
            )
    else:
        source = cfg["init_from"] or None
    import torch

    torch.manual_seed(cfg["seed"])
    model = Transformer(args)
    trained_dtype = checkpoint_meta(source).get("dtype_trained") if continuing else None
    trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype)
    log = RunLog(out / "log.jsonl", d.is_master, cfg["tensorboard"])
    if d.is_master:
        print(
            "config overrides: "
            + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals(), TrainConfig).items())
        )
        print(
            f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(True) / 1e6:.2f}M non-embedding), "
            f"world {d.world} on {d.device}, dtype {trainer.precision}, "
            f"{cfg['batch_size'] * cfg['grad_accum'] * d.world * args.max_seq_len:,} tokens/step"
        )
        print(
            f"schedule: {total} steps, warmup {cfg['warmup_iters']}, "
            f"decay ({cfg['decay_shape']}) from step {decay_start}"
        )

    data_state = None
    if cfg["init_from"] == "resume":
        ckpt = trainer.load(source)
        trainer.check_same_batch(ckpt, source)
        phase_of_checkpoint = first_phase
        first_phase = phase_of_checkpoint if trainer.step < ranges[phase_of_checkpoint][2] else phase_of_checkpoint + 1
        data_state = ckpt.get("data_state") if first_phase == phase_of_checkpoint else None
    elif source is not None:
        ckpt = trainer.load(source)  # weights and optimizer: the run continues from there
        same_phase = ckpt.get("phase") == names[first_phase] and trainer.step < ranges[first_phase][2]
        if same_phase:
            trainer.check_same_batch(ckpt, source)
        else:
            trainer.step = ranges[first_phase][1]
        data_state = ckpt.get("data_state") if same_phase else None
        if d.is_master:
            print(f"starting phase {names[first_phase]} at step {trainer.step} from {source}")
    if first_phase >= len(ranges):
        if d.is_master:
            print(f"all phases already done ({out}); nothing to train")
        d.close()
        return
    if cfg["stop_at"] and trainer.step >= cfg["stop_at"]:
        if d.is_master:
            print(f"{source} is at step {trainer.step}, already at or past stop_at={cfg['stop_at']}; nothing to train")
        d.close()
        return

    for i in range(first_phase, len(ranges)):
        phase, first, end = ranges[i]
        if cfg["stop_at"]:
            if trainer.step >= cfg["stop_at"]:
                break
            end = min(end, cfg["stop_at"])
        data = PretrainData(
            cfg["data_dir"],
            phase["mixture"],
            args.max_seq_len,
            cfg["seed"],
            i,
            cfg["val_fraction"],
            cfg["sampling"],
            tok.fingerprint,
            args.vocab_size,
        )
        data.load_state_dict(data_state)
        data_state = None
        if d.is_master:
            print(
                f"phase {i + 1}/{len(ranges)} {phase['name']}: "
                f"steps {max(first, trainer.step)}..{end}, {data.describe()}"
            )
        trainer.run(
            data,
            max(first, trainer.step),
            end,
            lr_at,
            log,
            out / phase["name"] / "ckpt.pt",
            phase=phase["name"],
            data_weights=dict(zip(data.names, data.weights)),
            desc=f"{i + 1}/{len(ranges)} {phase['name']}",
        )
        if d.is_master:
            plot_runs({"pretrain": read_log(log.path)}, out / "loss.png", title=f"pretraining: {out}")
            note = " (pre-decay checkpoint)" if end == decay_start else ""
            done = (
                "done" if end == ranges[i][2] else f"stopped at step {end} (stop_at); continue with --init_from=resume"
            )
            print(f"phase {phase['name']} {done}: {out / phase['name'] / 'ckpt.pt'}{note}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
