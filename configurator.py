"""nanoGPT's configurator, as a function: a script's module-level constants are its config, and
config files and --key=value arguments override them.

    python pretrain.py config/pretrain_tiny.py --batch_size=16 --dtype=float32

The keys a script accepts are its module-level constants plus, for the training scripts, the keys they all
share (trainer.TrainConfig, with its defaults) and, for those that fine-tune, the LoRA keys (lora.LoRAConfig).
A config file is Python run with the constants in scope (so it may compute from them); a --key=value value is
a Python literal, or a bare string. Unknown keys and type changes are errors: a typo must not train for a day
with the default.
"""

import ast
from dataclasses import fields
from pathlib import Path

CONFIG_TYPES = (int, float, bool, str, list, dict, tuple, type(None))


def config_keys(namespace):
    return {
        k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES) and not k.isupper()
    }


def _check(key, value, defaults, origin):
    if key not in defaults:
        close = [k for k in defaults if k.split("_")[0] == key.split("_")[0]]
        raise SystemExit(f"{origin}: unknown config key {key!r}" + (f" (did you mean {close}?)" if close else ""))
    default = defaults[key]
    if isinstance(value, bool) and not isinstance(default, bool) and default is not None:
        raise SystemExit(
            f"{origin}: {key} must be {type(default).__name__} like its default {default!r}, got {value!r}"
        )
    if default is None or value is None or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise SystemExit(f"{origin}: {key} must be {type(default).__name__} like its default {default!r}, got {value!r}")


def script_defaults(namespace, shared=None):
    """`shared`'s field defaults (a dataclass of the keys several scripts share, e.g. trainer.TrainConfig, or a
    tuple of them: (TrainConfig, lora.LoRAConfig)), overridden by the plain-valued public constants of
    `namespace` (the script's own keys and choices)."""
    shared = shared if isinstance(shared, tuple) else (shared,) if shared else ()
    return {f.name: f.default for kind in shared for f in fields(kind)} | config_keys(namespace)


def configure(namespace, argv, shared=None):
    """The config dict: script_defaults(namespace, shared) with the config files' and argv's overrides."""
    defaults = script_defaults(namespace, shared)
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"{arg}: write --{key}=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as --out_dir=out/run2
            config[key] = _check(key, value, defaults, arg)
        else:
            path = Path(arg)
            if not path.is_file():
                raise SystemExit(f"config file not found: {arg}")
            scope = dict(config)
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), scope)
            for key, value in config_keys(scope).items():
                if key not in config or value is not config[key]:
                    config[key] = _check(key, value, defaults, str(path))
    return config


def overrides(config, namespace, shared=None):
    """The keys whose values differ from the script's defaults (for the start-up log)."""
    defaults = script_defaults(namespace, shared)
    return {k: v for k, v in config.items() if defaults.get(k) != v}
