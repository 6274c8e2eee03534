"""Direct Preference Optimization (Rafailov et al. 2023) of an SFT checkpoint on preference pairs.

    python dpo.py config/dpo_tiny.py                                   # the sample pairs, the quickstart's model
    python dpo.py --init_from=out/sft/ckpt.pt --sources='["medical_reward=data/raw/medical/reward"]'
    python dpo.py config/dpo_tiny.py --lora_rank=8                     # LoRA: the reference is the base itself
    torchrun --standalone --nproc_per_node=8 dpo.py ...

For a prompt x with a chosen answer y_c and a rejected one y_r, with log-probabilities summed over the
answer's tokens (and its </s>) under the SFT chat template (dataset_sft.render, the only copy):

    rho_c = log pi(y_c | x) - log ref(y_c | x)        rho_r likewise
    loss  = -(1 - eps) log sigmoid(beta (rho_c - rho_r)) - eps log sigmoid(-beta (rho_c - rho_r))

eps = label_smoothing (cDPO: the labels are wrong with probability eps; 0 is the paper's loss) and the mean
over all pairs of the global batch, like TRL's "sigmoid" loss. The reference is the starting checkpoint,
frozen: a second copy of the model, or with lora_rank > 0 the policy itself with its adapters turned off,
which costs no memory. The trainer is trainer.py's, training DPOModel (policy + reference), whose loss
is summed over pairs, the trainer's units: 2 ranks x 4 pairs == 1 process x 8 pairs. Logged per step
(log.jsonl, loss.png): the loss, reward accuracy (the fraction of pairs with rho_c > rho_r), reward margin
beta (rho_c - rho_r), the rewards beta rho_c and beta rho_r, and the policy's log-probabilities of the chosen
and rejected answers, all means per pair; the same on the held-out pairs every eval_interval steps.

Preference data: any --sources of corpora.py's preference formats (medical_reward, dpo_pairs,
dpo_conversations); bad records are skipped and counted with their file:line. A pair keeps the prompt and
history both answers share: too long for max_seq_len, the earliest turns go first, then the start of the
prompt, the same for both; a pair whose longer answer cannot fit is dropped and counted.
"""

import itertools
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from atomic import atomic_write
from chatglm_tokenizer import load_tokenizer
from checkpoint import (
    CheckpointError,
    base_record,
    check_base,
    check_tokenizer,
    claim_run,
    load_checkpoint,
    load_weights,
    text_model_meta,
)
from configurator import configure, overrides
from corpora import Problems, iter_preferences, parse_source
from dataset_sft import RowBatches, fit_turns, labels_for, padded_batch, render, rows_sha256
from lm_head import IGNORE_INDEX
from lora import LoRAConfig
from model import ModelArgs, Transformer
from parallel import Dist
from runlog import LogError, RunLog, read_log
from trainer import NonFiniteLoss, TrainConfig, Trainer, check_config, epoch_schedule

# ---- DPO's own keys
out_dir = "out/dpo"
init_from = "out/sft/ckpt.pt"  # the checkpoint to start from (and the reference); "resume": this run's
sources = ["medical_reward=data/raw/medical/reward"]  # NAME=PATH_OR_GLOB of corpora.py's preference formats
beta = 0.1  # how far the policy may move from the reference (the KL penalty's inverse temperature)
label_smoothing = 0.0  # cDPO: the probability that a pair's preference is wrong
epochs = 1.0
max_iters = 0  # 0: epochs over the training pairs
# ---- the keys every training script shares (trainer.TrainConfig) that DPO sets otherwise (batch_size: pairs)
batch_size = 8
grad_accum = 2
learning_rate = 5e-6
min_lr_ratio = 0.1
warmup_iters = 20
decay_shape = "cosine"
weight_decay = 0.0
val_fraction = 0.05
eval_interval = 100
eval_windows = 64  # held-out pairs per source
log_interval = 5
save_interval = 500
# parallel stays ddp: the frozen reference is not sharded
SHARED = (TrainConfig, LoRAConfig)  # the keys it shares with the other training scripts


# ---------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing=0.0):
    """Per-pair losses, and the rewards beta * rho of the chosen and rejected answers, from summed log-probs."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, x, y):
    """log p(targets) of every row, summed over its targets != -100."""
    return -model(x, y, reduction="none").sum(dim=1)


class DPOModel(nn.Module):
    """What the trainer trains: the policy, with the reference it is compared to. A batch (PreferenceData) is
    rows [chosen_1 .. chosen_B, rejected_1 .. rejected_B]; forward returns the DPO loss summed over its pairs and
    the metrics, also sums over pairs (trainer.py's units and metrics). reference: a frozen model, or None with
    LoRA: the policy itself, its adapters off. Checkpoints hold the policy (state_dict is the policy's), so a DPO
    checkpoint is a model checkpoint like any other."""

    unit = "pairs"
    metrics = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")

    def __init__(self, policy, reference=None, beta=0.1, label_smoothing=0.0):
        super().__init__()
        self.policy, self.reference = policy, reference
        self.beta, self.label_smoothing = beta, label_smoothing
        if reference is not None:
            reference.eval().requires_grad_(False)

    @property
    def args(self):
        return self.policy.args

    def units(self, y):
        """The pairs of a batch that have answer targets (a filler batch of the trainer's has none)."""
        return int(answered(y).sum())

    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.policy.load_state_dict(state_dict, strict, assign)

    def flops_per_token(self, seq_len):
        return self.policy.flops_per_token(seq_len) * 4 / 3  # + the reference's forward: a third of 6N

    def compile_for_training(self):
        self.policy.compile_for_training()

    @torch.no_grad()
    def reference_logps(self, x, y):
        if self.reference is None:
            with lora.disabled(self.policy):
                return sequence_logps(self.policy, x, y)
        return sequence_logps(self.reference.eval(), x, y)

    def forward(self, x, y, reduction="sum"):
        reference_chosen, reference_rejected = self.reference_logps(x, y).chunk(2)
        policy_chosen, policy_rejected = sequence_logps(self.policy, x, y).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta, self.label_smoothing
        )
        real = answered(y)
        chosen_rewards, rejected_rewards = chosen_rewards.detach()[real], rejected_rewards.detach()[real]
        metrics = {
            "reward_accuracy": (chosen_rewards > rejected_rewards).sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "reward_chosen": chosen_rewards.sum(),
            "reward_rejected": rejected_rewards.sum(),
            "logp_chosen": policy_chosen.detach()[real].sum(),
            "logp_rejected": policy_rejected.detach()[real].sum(),
        }
        return (losses * real).sum(), metrics


def answered(y):
    """Which pairs of a batch have answer targets: all but those of a filler batch (trainer.evaluate's)."""
    return (y != IGNORE_INDEX).any(dim=1).chunk(2)[0]


# ---------------------------------------------------------------------------- the data
class PreferenceData(RowBatches):
    """Tokenized preference pairs, split into train and validation, served as deterministic batches (step s of
    any (world, grad_accum) split gets the same global pairs). A batch of B pairs is (X, Y) of 2B rows, the chosen
    conversations first; Y keeps only the final answer's targets (and its </s>), so each row's summed log-prob
    is that of its answer."""

    def __init__(self, sources, tokenizer, seq_len, seed=1337, val_fraction=0.05, encode_batch=512):
        self.seq_len, self.seed, self.pad_id = seq_len, seed, tokenizer.pad_id
        self.problems, self.dropped = Problems(), Counter()
        self.rows, names = [], []  # rows: per pair, ((x, y) chosen, (x, y) rejected) as int32 arrays
        records = ((source.name, pair) for source in sources for pair in iter_preferences(source, self.problems))
        while chunk := list(itertools.islice(records, encode_batch)):
            texts = [
                text
                for _, p in chunk
                for text in [t for turn in p["history"] for t in turn] + [p["prompt"], p["chosen"], p["rejected"]]
            ]
            encoded = iter(tokenizer.encode_batch(texts))
            for name, pair in chunk:
                history = [(next(encoded), next(encoded)) for _ in pair["history"]]
                prompt, chosen, rejected = next(encoded), next(encoded), next(encoded)
                rows = self.render_pair(history, prompt, chosen, rejected, tokenizer.bos_id, tokenizer.eos_id)
                if rows is None:
                    self.dropped["answer longer than max_seq_len"] += 1
                    continue
                self.rows.append(rows)
                names.append(name)
        if not self.rows:
            raise ValueError(
                f"no preference pair to train on in {[s.location for s in sources]} "
                f"({dict(self.dropped) or self.problems.summary()})"
            )
        self.sources = np.array(names)
        order = np.random.default_rng(seed).permutation(len(self.rows))
        n_val = int(round(len(order) * val_fraction)) if len(order) > 1 else 0
        self.val_ids, self.train_ids = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.fingerprint = rows_sha256(self.rows, self.train_ids, seed)

    def render_pair(self, history, prompt, chosen, rejected, bos_id, eos_id):
        """((x, y) of the chosen conversation, (x, y) of the rejected one), cut to max_seq_len the same way: the
        context both share is what fits with the longer answer. None when that answer cannot fit."""
        fitted = fit_turns(history + [(prompt, max(chosen, rejected, key=len))], self.seq_len + 1)
        if fitted is None:
            return None
        context = fitted[:-1] + [(fitted[-1][0], None)]
        context_ids, _ = render(context, bos_id, eos_id)
        rows = []
        for answer in (chosen, rejected):
            ids, _ = render(context[:-1] + [(fitted[-1][0], answer)], bos_id, eos_id)
            is_answer = [False] * len(context_ids) + [True] * (len(ids) - len(context_ids))
            x, y = labels_for(ids, is_answer)
            rows.append((np.asarray(x, dtype=np.int32), np.asarray(y, dtype=np.int32)))
        return tuple(rows)

    def __len__(self):
        return len(self.train_ids)

    def describe(self):
        drops = f", dropped {dict(self.dropped)}" if self.dropped else ""
        skipped = f", {self.problems.total} records skipped" if self.problems.total else ""
        return f"{len(self.train_ids)} train / {len(self.val_ids)} val pairs{drops}{skipped}"

    def epoch(self, e):
        """Pair ids of epoch e, in their order."""
        return self.train_ids[np.random.default_rng([self.seed, e]).permutation(len(self.train_ids))]

    def row(self, g):
        """Pair id of global row g, counting across epochs."""
        return int(self.epoch(g // len(self.train_ids))[g % len(self.train_ids)])

    def to_batch(self, pair_ids):
        rows = [self.rows[i][0] for i in pair_ids] + [self.rows[i][1] for i in pair_ids]
        return padded_batch(rows, self.seq_len, self.pad_id)

    def val_row(self, i):
        return i


# ---------------------------------------------------------------------------- the picture
PANELS = (
    ("loss", ("loss",)),
    ("reward accuracy", ("reward_accuracy",)),
    ("rewards (beta x log-ratio)", ("reward_margin", "reward_chosen", "reward_rejected")),
    ("policy log-prob of the answer", ("logp_chosen", "logp_rejected")),
)


def held_out(record, key):
    """The held-out value of `key` in a log record (the mean over sources), or None."""
    if key == "loss":
        return record.get("val/val")
    values = [v for k, v in record.items() if k.startswith("val/") and k.endswith("/" + key)]
    return float(np.mean(values)) if values else None


def plot_dpo(records, out_path, title):
    """loss.png of a DPO run: loss, reward accuracy, rewards and log-probs against step; train lines, held-out
    points (the mean over sources)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (label, keys) in zip(axes.flat, PANELS):
        for key in keys:
            train = [(r["step"], r[key]) for r in records if key in r]
            val = [(r["step"], held_out(r, key)) for r in records if held_out(r, key) is not None]
            color = None
            if train:
                color = ax.plot(*zip(*train), label=f"{key} train", linewidth=1)[0].get_color()
            if val:
                ax.plot(*zip(*val), "o", color=color, label=f"{key} held-out", markersize=4)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


# ---------------------------------------------------------------------------- the run
def check_dpo_config(cfg):
    check_config(cfg)
    if not 0 < cfg["beta"] < math.inf:
        raise SystemExit(f"config: beta must be a number > 0, not {cfg['beta']}")
    if not 0 <= cfg["label_smoothing"] < 0.5:
        raise SystemExit(f"config: label_smoothing must be in [0, 0.5), not {cfg['label_smoothing']}")
    if cfg["parallel"] != "ddp":
        raise SystemExit("config: DPO runs with parallel=ddp (the frozen reference is not sharded)")
    if not cfg["sources"]:
        raise SystemExit("config: sources is empty: name at least one NAME=PATH of preference pairs")
    return lora.settings_from(cfg)


def main(argv):
    cfg = configure(globals(), argv, SHARED)
    settings = check_dpo_config(cfg)
    try:
        sources = [parse_source(spec) for spec in cfg["sources"]]
    except (OSError, ValueError) as err:
        raise SystemExit(f"dpo.py: {err}") from None
    try:
        train(cfg, settings, sources)
    except (CheckpointError, LogError, OSError, NonFiniteLoss) as err:
        raise SystemExit(f"dpo.py: {err}") from None


def train(cfg, settings, sources):
    d = Dist(cfg["device"])
    tok = load_tokenizer(cfg["tokenizer"])
    out = Path(cfg["out_dir"])
    resume = cfg["init_from"] == "resume"
    source = out / "ckpt.pt" if resume else Path(cfg["init_from"])
    start = text_model_meta(source)
    if start.get("lora") and not resume:
        raise SystemExit(
            f"{source} holds LoRA adapters, not a model: start from a full checkpoint (merge_lora.py "
            "folds an adapter into its base)"
        )
    run_id = claim_run(out, resume, source, start, cfg["overwrite"], "dpo.py", d)
    check_tokenizer(start, source, tok, cfg["tokenizer"])
    args = ModelArgs(**{**start["model_args"], "dropout": cfg["dropout"]})
    if tok.vocab_size > args.vocab_size:
        raise SystemExit(f"{cfg['tokenizer']} has {tok.vocab_size} ids but {source}'s model embeds {args.vocab_size}")
    try:
        data = PreferenceData(sources, tok, args.max_seq_len, cfg["seed"], cfg["val_fraction"])
    except ValueError as err:  # no usable pair
        raise SystemExit(f"dpo.py: {err}") from None
    torch.manual_seed(cfg["seed"])
    policy = Transformer(args)
    meta = lora.prepare(policy, settings, source, start, resume)
    reference = None  # LoRA: the policy with its adapters off
    if not settings:  # a frozen copy of the starting checkpoint; a resumed run's is the one it names, unchanged
        meta = {"base": start["base"] if resume else base_record(source)}
        base = check_base(meta["base"]) if resume else source
        reference = Transformer(args)
        load_weights(reference, load_checkpoint(base)["model"], base)
    model = DPOModel(policy, reference, cfg["beta"], cfg["label_smoothing"])
    trained_dtype = start.get("dtype_trained") if resume else None
    trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=bool(settings))
    total, lr_at, plan = epoch_schedule(cfg, len(data), d.world, unit="pairs")

    if resume:
        trainer.resume(source, data)
    elif not settings:
        trainer.load_weights(source)
    log = RunLog(out / "log.jsonl", d.is_master, cfg["tensorboard"])
    if d.is_master:
        print("config overrides: " + ", ".join(f"{k}={v!r:.60}" for k, v in overrides(cfg, globals(), SHARED).items()))
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        kind = "the base with adapters off" if settings else f"a frozen copy of {meta['base']['path']}"
        print(
            f"DPO from {source}: {policy.num_params() / 1e6:.2f}M parameters, {trained / 1e6:.3f}M trained"
            f"{lora.describe(settings)}; reference: {kind}; beta {cfg['beta']}, label smoothing "
            f"{cfg['label_smoothing']}; world {d.world} on {d.device}, dtype {trainer.precision}"
        )
        print(f"data: {data.describe()}; {plan}")
        if data.problems.total:
            print(data.problems.summary())
    end = min(total, cfg["stop_at"]) if cfg["stop_at"] else total
    if trainer.step >= end:
        if d.is_master:
            print(f"DPO already at step {trainer.step} of {end}; nothing to train")
        d.close()
        return
    trainer.run(data, trainer.step, end, lr_at, log, out / "ckpt.pt", phase="dpo", desc="dpo")
    if d.is_master:
        plot_dpo(read_log(log.path), out / "loss.png", title=f"DPO: {out}")
        if settings:
            print(f"adapter: {lora.save_run_adapter(policy, meta, out, 'dpo', trainer.step, tok.fingerprint)}")
        stopped = "" if end == total else f" (stopped at step {end} of {total}: continue with --init_from=resume)"
        print(f"saved {out / 'ckpt.pt'}{stopped}")
    d.close()


if __name__ == "__main__":
    main(sys.argv[1:])
