"""LoRA (Hu et al. 2021) for model.py's Transformer, saved in PEFT's format under Hugging Face Llama names.

    add_adapters(model, rank=8, alpha=16, dropout=0.05)   # every weight frozen, adapters on wq..w3
    ...train...
    save_adapter(model, "out/sft_lora/adapter", settings, info)   # adapter_config.json + adapter_model.safetensors
    load_adapter(model, "out/sft_lora/adapter"); merge(model)      # a plain Transformer again, adapters folded in

A target linear layer W (out x in) keeps its weight frozen and gains two small matrices, A (rank x in, random)
and B (out x rank, zero at the start, so training starts from the base model exactly):

    y = x W^T + (dropout(x) A^T B^T) * alpha / rank

Only A and B are trained and saved: a few hundred KB instead of the whole model. merge() folds them into W
(W + alpha / rank * B A): the merged model computes the same function with no extra work.

The folder is what PEFT writes for a LlamaForCausalLM: the names are export_hf.py's (wq -> self_attn.q_proj,
w1 -> mlp.gate_proj, w3 -> mlp.up_proj, w2 -> mlp.down_proj ...), A and B as PEFT stores them, (rank, in) and
(out, rank). Our RoPE is already transformers' rotate-half layout (export_hf.py copies wq and wk unpermuted),
so B needs no permutation either. So, with nothing of this repository:

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(export_dir), adapter_dir)

gives our logits (tested). The safetensors metadata also names the base checkpoint the adapter was trained
on (path, run id, step), which load_adapter checks, so an adapter is never applied to another model.
"""

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write, atomic_write_text
from checkpoint import CheckpointError, base_record, check_base, load_checkpoint, load_weights
from export_hf import LAYER_NAMES

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ATTENTION = ("wq", "wk", "wv", "wo")  # in Block.attention; the rest in Block.feed_forward
MODULE = {name: ("attention." if name in ATTENTION else "feed_forward.") + name for name in TARGETS}
HF_MODULE = {name: LAYER_NAMES[MODULE[name]].split(".")[1] for name in TARGETS}  # wq -> q_proj, w1 -> gate_proj
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT settings that change what an adapter computes: a folder must have these values (or null) to be applied here
PLAIN_LORA = {
    "bias": "none",
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "modules_to_save": [],
    "layers_to_transform": [],
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": [],
    "target_parameters": [],
    "trainable_token_indices": [],
}
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen weight and a trainable low-rank update (see the module doc). It
    holds the base layer's own weight Parameter under the same name, so the model's state-dict keys for the base
    weights do not change; the adapters add `<layer>.lora_A.weight` and `<layer>.lora_B.weight`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        out_features, in_features = base.weight.shape
        device = base.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        out = F.linear(x, self.weight)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self):
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


# ---------------------------------------------------------------------------- settings
@dataclass
class LoRAConfig:
    """The LoRA keys of the scripts that fine-tune (sft.py, dpo.py, vlm_train.py's instruct stage), with their
    defaults: configurator.configure(globals(), argv, (TrainConfig, LoRAConfig))."""

    lora_rank: int = 0  # 0: every weight trains; > 0: the base is frozen and adapters of this rank train
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"  # the linear layers of every block that get adapters


def settings_from(cfg):
    """The LoRA settings of a script's config ({rank, alpha, dropout, targets}), None for lora_rank=0 (full
    fine-tuning). A bad value stops the run before anything is built, with one line naming the key."""
    rank, alpha, dropout = cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]
    if rank < 0:
        raise SystemExit(f"config: lora_rank must be >= 0 (0: no LoRA), not {rank}")
    if rank == 0:
        return None
    if not 0 < alpha < math.inf:
        raise SystemExit(f"config: lora_alpha must be a number > 0, not {alpha}")
    if not 0 <= dropout < 1:
        raise SystemExit(f"config: lora_dropout must be in [0, 1), not {dropout}")
    targets = [t.strip() for t in cfg["lora_targets"].split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise SystemExit(
            f"config: lora_targets {cfg['lora_targets']!r}: name some of {','.join(TARGETS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    if cfg.get("parallel") == "fsdp":
        raise SystemExit(
            "config: LoRA runs with parallel=ddp: its trained weights are small (FSDP shards models whose "
            "weights do not fit on one GPU)"
        )
    return {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "targets": [t for t in TARGETS if t in targets],
    }


def describe(settings):
    if not settings:
        return ""
    return (
        f" (LoRA rank {settings['rank']}, alpha {settings['alpha']:g}, dropout {settings['dropout']:g} on "
        f"{','.join(settings['targets'])})"
    )


def prepare(model, settings, source, start, resume):
    """LoRA for a run of sft.py, dpo.py or vlm_train.py: the base checkpoint's weights into `model` (a new run's
    base is `source`; a resumed one's is the base its checkpoint `start` names, which must be unchanged), then the
    adapters on its language model (a VLM's .llm; what else of a VLM trains stays as it was). Returns the entries
    the run's checkpoints carry ({"lora": settings, "base": ...}; {} without LoRA)."""
    if resume and start.get("lora") != settings:
        raise SystemExit(
            f"{source} was trained with LoRA {start.get('lora')}, not {settings}: resume with the run's "
            "own lora_* settings"
        )
    if not settings:
        return {}
    try:
        record = start["base"] if resume else base_record(source)
        base = check_base(record) if resume else Path(source)
        ckpt = load_checkpoint(base)
        if ckpt.get("lora"):
            raise CheckpointError(
                f"{base} holds LoRA adapters, not a model: start from a full checkpoint "
                "(merge_lora.py folds an adapter into its base)"
            )
        mine, theirs = {**ckpt["model_args"], "dropout": 0}, {**start["model_args"], "dropout": 0}
        if mine != theirs:
            raise CheckpointError(f"{base}: its model arguments {mine} differ from this run's {theirs}")
        load_weights(model, ckpt["model"], base)
    except CheckpointError as err:
        raise SystemExit(f"LoRA base: {err}") from None
    add_adapters(language_model(model), settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
    return {"lora": settings, "base": record}


def language_model(model):
    """The Transformer of `model`: itself, or a VLM's .llm."""
    return getattr(model, "llm", model)


def save_run_adapter(model, meta, out_dir, phase, step, tokenizer_fingerprint):
    """A LoRA run's export: out_dir/adapter in PEFT's format, its metadata naming the base checkpoint."""
    base = meta["base"]
    return save_adapter(
        language_model(model),
        Path(out_dir) / "adapter",
        meta["lora"],
        {
            "base_checkpoint": base["path"],
            "base_run_id": base["run_id"],
            "base_step": base["step"],
            "phase": phase,
            "step": step,
            "tokenizer_fingerprint": tokenizer_fingerprint,
        },
    )


# ---------------------------------------------------------------------------- adapters in a model


def add_adapters(model, rank, alpha, dropout=0.0, targets=TARGETS):
    """Freeze every parameter of `model` (a Transformer) and put a LoRALinear on each target layer of every block.
    Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for name in targets:
            parent = block.attention if name in ATTENTION else block.feed_forward
            layer = LoRALinear(getattr(parent, name), rank, alpha, dropout)
            setattr(parent, name, layer.train(model.training))  # an eval-mode model gets eval-mode adapters
    return model


def adapter_layers(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


@contextlib.contextmanager
def disabled(model):
    """The base model: adapters off (and dropout off) inside the block. DPO's reference with LoRA on is the policy
    itself this way, with no copy of the model."""
    layers = adapter_layers(model)
    training = model.training
    model.eval()
    for _, layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.enabled = True
        model.train(training)


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight (W + alpha / rank * B A) and put plain nn.Linear layers back: the model
    is an ordinary Transformer with the same function, its state dict the base's keys."""
    for name, layer in adapter_layers(model):
        parent_name, _, attribute = name.rpartition(".")
        out_features, in_features = layer.weight.shape
        plain = nn.Linear(in_features, out_features, bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight.copy_(layer.merged_weight())
        setattr(model.get_submodule(parent_name), attribute, plain)
    return model


# ---------------------------------------------------------------------------- PEFT's folder


def peft_key(name):
    """Our adapter key (layers.3.feed_forward.w2.lora_B.weight) -> PEFT's for the Llama export
    (base_model.model.model.layers.3.mlp.down_proj.lora_B.weight)."""
    _, layer, rest = name.split(".", 2)
    module, matrix = rest.rsplit(".lora_", 1)
    return f"base_model.model.model.layers.{layer}.{LAYER_NAMES[module]}.lora_{matrix}"


def our_key(key):
    """PEFT's key -> ours, or None for a key that is not a LoRA matrix of a target layer."""
    match = PEFT_KEY.fullmatch(key)
    ours = {hf: name for name, hf in HF_MODULE.items()}
    if not match or match[2] not in ours:
        return None
    return f"layers.{match[1]}.{MODULE[ours[match[2]]]}.lora_{match[3]}.weight"


def peft_config(settings):
    """adapter_config.json: PEFT's LoraConfig fields that define the adapter (the rest take PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": [HF_MODULE[t] for t in settings["targets"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
    }


def adapter_card(settings, info):
    targets = ", ".join(f"`{HF_MODULE[t]}`" for t in settings["targets"])
    return f"""---
library_name: peft
tags:
- lora
- medical
---

# Mini-Chinese-GPT LoRA adapter ({info.get("phase")}, step {info.get("step")})

LoRA rank {settings["rank"]}, alpha {settings["alpha"]:g}, dropout {settings["dropout"]:g} on {targets} of every
layer, trained on top of `{info.get("base_checkpoint")}`.

With Mini-Chinese-GPT: `python chat.py --ckpt BASE_CHECKPOINT --adapter THIS_FOLDER`, or fold it in with
`python merge_lora.py --ckpt BASE_CHECKPOINT --adapter THIS_FOLDER --out merged.pt`.

With transformers + PEFT, on the base checkpoint exported by `export_hf.py`:

```python
from peft import PeftModel
from transformers import LlamaForCausalLM

model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("EXPORTED_BASE"), "THIS_FOLDER")
```

A small research model: its answers are not medical advice.
"""


def save_adapter(model, folder, settings, info):
    """Write the adapters of `model` as a PEFT folder. info (strings): base_checkpoint, base_run_id, base_step,
    phase, step, tokenizer_fingerprint; kept in the safetensors metadata. Each file is replaced atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {
        peft_key(name): tensor.detach().float().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if ".lora_" in name
    }
    metadata = {"format": "pt", **{k: str(v) for k, v in info.items() if v is not None}}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(peft_config(settings), indent=2) + "\n")
    atomic_write_text(folder / "README.md", adapter_card(settings, info))
    return folder


def read_adapter(folder):
    """(settings, {our key: tensor}, metadata) of a PEFT LoRA folder, or CheckpointError naming what is wrong:
    a folder written here, or by PEFT for our Llama export with LoRA on the linear layers only."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder} is not a LoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not JSON ({err})") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {peft_type!r}, not 'LORA'")
    unsupported = [
        f"{key}={config[key]!r}" for key, plain in PLAIN_LORA.items() if config.get(key) not in (None, plain)
    ]
    targets = config.get("target_modules")
    ours = {hf: name for name, hf in HF_MODULE.items()}
    if not isinstance(targets, list) or not targets or any(t not in ours for t in targets):
        unsupported.append(f"target_modules={targets!r} (only {', '.join(HF_MODULE.values())} as a list)")
    if unsupported:
        raise CheckpointError(f"{config_path}: settings this loader does not apply: {', '.join(map(str, unsupported))}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise CheckpointError(f"{config_path}: r={rank!r} and lora_alpha={alpha!r} must be positive numbers")
    settings = {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(config.get("lora_dropout") or 0.0),
        "targets": [t for t in TARGETS if HF_MODULE[t] in targets],
    }
    tensors = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                name = our_key(key)
                if name is None:
                    raise CheckpointError(
                        f"{weights_path}: tensor {key!r} is not a LoRA matrix of "
                        f"{', '.join(HF_MODULE.values())}: not an adapter for this model"
                    )
                tensors[name] = f.get_tensor(key)
                if not torch.isfinite(tensors[name]).all():  # folded in, it would make every logit NaN
                    raise CheckpointError(f"{weights_path}: tensor {key!r} holds NaN or inf values: a damaged adapter")
    except SafetensorError as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return settings, tensors, metadata


def trained_as(metadata, base):
    """{phase, step} of the run that trained an adapter (its metadata), else those of its base checkpoint."""
    step = metadata.get("step", "")
    return {
        "phase": metadata.get("phase", base.get("phase")),
        "step": int(step) if step.isdigit() else base.get("step"),
    }


def load_adapter(model, folder, base=None):
    """Add the adapters of a PEFT folder to `model` (read_adapter's checks, then every matrix must fit the model:
    each target layer of every block, shapes included). base: the model's checkpoint dict, checked against the
    run id and step the adapter records it was trained on. Returns the adapter's metadata."""
    settings, tensors, metadata = read_adapter(folder)
    if base is not None and "base_step" in metadata:
        theirs = (metadata.get("base_run_id", "None"), metadata["base_step"])
        if theirs != (str(base.get("run_id")), str(base.get("step"))):
            raise CheckpointError(
                f"{folder} was trained on {metadata.get('base_checkpoint')} (run {theirs[0]}, step "
                f"{theirs[1]}), not on this checkpoint (run {base.get('run_id')}, step "
                f"{base.get('step')}): pass that one as --ckpt"
            )
    add_adapters(model, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
    expected = {name: tensor.shape for name, tensor in model.state_dict().items() if ".lora_" in name}
    wrong = sorted(set(expected) ^ set(tensors)) + [
        f"{name} {tuple(tensor.shape)} (model: {tuple(expected[name])})"
        for name, tensor in tensors.items()
        if name in expected and tensor.shape != expected[name]
    ]
    if wrong:
        raise CheckpointError(
            f"{folder} does not fit this model ({len(wrong)} missing, extra or mis-shaped matrices, "
            f"e.g. {wrong[0]}): it was trained on another model"
        )
    model.load_state_dict(tensors, strict=False)
    return metadata
