"""precision.py: the one dtype resolver. The speed probe is injected: tests never time anything."""

import runpy
import warnings

import pytest
import torch

import precision
from configurator import configure
from trainer import TrainConfig

from conftest import ROOT


@pytest.mark.parametrize(
    "speedup,expected", [(0.02, "float32"), (0.9, "float32"), (1.05, "float32"), (2.3, "bfloat16"), (5.0, "bfloat16")]
)
def test_auto_picks_bf16_only_where_it_is_faster(speedup, expected):
    choice = precision.resolve("auto", "cpu", "train", dim=128, speedup=speedup)
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: bf16 matmul")
    assert ("slower" in choice.reason) == (speedup < 1)


def test_start_up_line_names_the_factor():
    assert (
        str(precision.resolve("auto", "cpu", speedup=1 / 37))
        == "float32 (auto: bf16 matmul 37x slower than fp32 on this CPU)"
    )
    assert (
        str(precision.resolve("auto", "cpu", speedup=2.31))
        == "bfloat16 (auto: bf16 matmul 2.3x faster than fp32 on this CPU)"
    )
    assert (  # near a tie the factor keeps its decimal (generation on an AMX CPU: bf16 1.3x slower)
        str(precision.resolve("auto", "cpu", speedup=1 / 1.3))
        == "float32 (auto: bf16 matmul 1.3x slower than fp32 on this CPU)"
    )


def test_explicit_bf16_on_a_slow_cpu_runs_as_asked_and_warns_once(monkeypatch):
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = precision.resolve("bfloat16", "cpu", speedup=0.025)
        second = precision.resolve("bfloat16", "cpu", speedup=0.025)
    assert first.dtype == second.dtype == "bfloat16"
    assert len(caught) == 1 and "40x slower" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.resolve("bfloat16", "cpu", speedup=2.0).dtype == "bfloat16"
    assert not caught


def test_explicit_dtypes_are_kept_and_unknown_ones_refused():
    for name in ("float32", "float16"):
        assert precision.resolve(name, "cpu", speedup=5.0).dtype == name
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve("fp8", "cpu")


def test_the_probe_is_measured_once_per_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(
        precision,
        "_best_time",
        lambda a, b, repeats: calls.append(a.dtype) or (1.0 if a.dtype == torch.float32 else 4.0),
    )
    precision.bf16_speedup.cache_clear()
    try:
        assert precision.bf16_speedup(8, 16, 32) == 0.25  # the small square product already shows bf16 is slow
        assert precision.bf16_speedup(8, 16, 32) == 0.25
        assert len(calls) == 2
    finally:
        precision.bf16_speedup.cache_clear()


def test_generation_probes_a_decoding_row_against_the_head():
    assert precision.probe_shape("generate", 128, 64794) == (1, 128, 64794)
    assert precision.probe_shape("train", 128, 64794) == (512, 128, 2048)


@pytest.mark.parametrize("config", sorted((ROOT / "config").glob("*.py")), ids=lambda p: p.name)
def test_shipped_configs_leave_dtype_on_auto(config):
    script = {"sft": "sft.py", "vlm": "vlm_train.py", "dpo": "dpo.py"}.get(config.stem.split("_")[0], "pretrain.py")
    namespace = runpy.run_path(str(ROOT / script), run_name="config_check")
    assert configure(namespace, [str(config)], TrainConfig)["dtype"] == "auto"


def test_pretrain_with_auto_on_a_cpu_without_fast_bf16_trains_in_float32(
    tmp_path, monkeypatch, capsys, tiny_tokenizer_dir, token_dir
):
    from test_pretrain import tiny_args

    import pretrain

    monkeypatch.setattr(precision, "bf16_speedup", lambda rows, dim, cols: 1 / 60)
    args = [a for a in tiny_args(tmp_path, token_dir, tiny_tokenizer_dir) if not a.startswith("--dtype=")]
    pretrain.main(args + ["--dtype=auto"])
    assert "dtype float32 (auto: bf16 matmul 60x slower than fp32 on this CPU)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["dtype_trained"] == "float32"


def test_a_resumed_auto_run_keeps_the_precision_it_was_trained_in(
    tmp_path, monkeypatch, capsys, tiny_tokenizer_dir, token_dir
):
    """Started where bf16 is fast, resumed where it is slow (another host kind): still bf16."""
    from test_pretrain import tiny_args

    import pretrain

    args = [a for a in tiny_args(tmp_path, token_dir, tiny_tokenizer_dir) if not a.startswith("--dtype=")]
    monkeypatch.setattr(precision, "bf16_speedup", lambda rows, dim, cols: 3.0)
    pretrain.main(args + ["--dtype=auto", "--stop_at=3"])
    assert "dtype bfloat16 (auto: bf16 matmul 3.0x faster" in capsys.readouterr().out
    monkeypatch.setattr(precision, "bf16_speedup", lambda rows, dim, cols: 1 / 60)
    pretrain.main(args + ["--dtype=auto", "--init_from=resume"])
    assert "dtype bfloat16 (auto: the precision this run was trained in)" in capsys.readouterr().out
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["dtype_trained"] == "bfloat16"


def test_probes_leave_the_global_random_state_alone():
    """Resume is bit-exact only if measuring the machine draws nothing from the training RNG."""
    precision.bf16_speedup.cache_clear()
    precision.matmul_peak.cache_clear()
    before = torch.get_rng_state()
    precision.bf16_speedup(16, 32, 64)
    precision.matmul_peak("cpu", "float32", n=64, repeats=1)
    assert torch.equal(torch.get_rng_state(), before)
