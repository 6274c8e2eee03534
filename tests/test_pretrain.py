"""dataset.py, trainer.py, pretrain.py: mixtures, schedules, accumulation, resume, DDP and FSDP2."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configurator import configure
from dataset import DataError, PretrainData, TokenSource
from model import ModelArgs, Transformer
from parallel import Dist
from runlog import RunLog
from trainer import NonFiniteLoss, Trainer, wsd_lr

from conftest import ROOT, quiet_config, write_source

DECAY_FIRST = {"name": "a", "iters": 2, "decay": True, "mixture": {"general": 1}}  # a decay phase before another
PHASES = [
    {"name": "one", "iters": 6, "mixture": {"general": 1}},
    {"name": "two", "iters": 6, "decay": True, "mixture": {"general": 1, "medical": 1, "guide": 1}},
]


def tiny_args(out_dir, token_dir, tokenizer_dir, *extra):
    """pretrain.py arguments for a 2-layer d32 model over PHASES, fp32, logging every step."""
    return [
        "config/pretrain_tiny.py",
        f"--data_dir={token_dir}",
        f"--out_dir={out_dir}",
        f"--tokenizer={tokenizer_dir}",
        "--dim=32",
        "--n_layers=2",
        "--n_heads=2",
        "--n_kv_heads=1",
        "--max_seq_len=32",
        "--batch_size=4",
        "--warmup_iters=2",
        f"--phases={PHASES!r}",
        "--eval_interval=6",
        "--eval_windows=4",
        "--log_interval=1",
        "--dropout=0.0",
        "--progress=False",
        "--dtype=float32",
        "--tensorboard=False",
        *extra,
    ]


def cli(tmp_path, token_dir, tokenizer_dir, *extra, nproc=1, check=True):
    args = tiny_args(tmp_path, token_dir, tokenizer_dir, *extra)
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    result = subprocess.run(
        launcher + ["pretrain.py"] + args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(out_dir):
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


# ---------------------------------------------------------------------------- dataset
def test_every_shard_is_used_and_val_is_held_out(token_dir):
    src = TokenSource(token_dir / "general", seq_len=31, val_fraction=0.1)
    assert len(src.shards) == 2 and src.too_small == ["general_0002.bin"]
    shard_of = [int(np.searchsorted(src.cumulative, i, side="right")) for i in range(src.n_train_windows)]
    assert set(shard_of) == {0, 1}
    # train windows end before the shard's held-out tail
    for shard, lo, hi in src.val_slices:
        last = src.cumulative[shard] - 1
        start = last - (src.cumulative[shard - 1] if shard else 0)
        assert start + src.window <= lo
        assert hi - lo >= src.window


def test_mixture_proportions(token_dir):
    data = PretrainData(token_dir, {"general": 0.3, "medical": 0.3, "guide": 0.4}, seq_len=16, seed=1)
    counts = np.zeros(3)
    for step in range(200):
        source, _ = data.plan(step, 64)
        counts += np.bincount(source, minlength=3)
    shares = counts / counts.sum()
    assert np.allclose(shares, [0.3, 0.3, 0.4], atol=0.02), shares


def test_batches_are_deterministic_and_rank_slices_compose(token_dir):
    data = PretrainData(token_dir, {"general": 1, "medical": 1}, seq_len=16, seed=3)
    whole = data.train_batches(step=5, micro_steps=1, batch_size=8)[0][0]
    ranks = [data.train_batches(5, 1, 4, rank=r, world=2)[0][0] for r in range(2)]
    accum = [x for x, _ in data.train_batches(5, 2, 4)]
    assert torch.equal(whole, torch.cat(ranks)) and torch.equal(whole, torch.cat(accum))
    x, y = data.train_batches(5, 1, 8)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(whole, data.train_batches(6, 1, 8)[0][0])


def test_sequential_sampling_reads_in_order_and_resumes(token_dir):
    data = PretrainData(token_dir, {"medical": 1}, seq_len=16, seed=0, sampling="sequential")
    first = torch.cat([data.train_batches(s, 1, 4)[0][0] for s in range(3)])
    starts = [int(x[0]) for x in first]
    src = data.sources[0]
    assert [int(src.train_window(i)[0]) for i in range(12)] == starts
    state = data.state_dict()
    again = PretrainData(token_dir, {"medical": 1}, seq_len=16, seed=0, sampling="sequential")
    again.load_state_dict(state)
    assert torch.equal(again.train_batches(3, 1, 4)[0][0], data.train_batches(3, 1, 4)[0][0])


def test_missing_source_or_other_tokenizer_is_a_clear_error(token_dir, tmp_path):
    with pytest.raises(DataError, match="no token folder for \\['nope'\\].*run data_process.py"):
        PretrainData(token_dir, {"nope": 1}, seq_len=16)
    write_source(tmp_path, "medical", [500], tokenizer_sha256="a" * 64)
    PretrainData(tmp_path, {"medical": 1}, seq_len=16, tokenizer_fingerprint="a" * 64)
    with pytest.raises(ValueError, match="re-run data_process.py"):
        PretrainData(tmp_path, {"medical": 1}, seq_len=16, tokenizer_fingerprint="b" * 64)
    (tmp_path / "medical" / "manifest.json").unlink()  # what a killed data_process.py run can leave
    with pytest.raises(DataError, match="no manifest.json"):
        PretrainData(tmp_path, {"medical": 1}, seq_len=16)


# ---------------------------------------------------------------------------- schedule, config
def test_wsd_values_for_every_shape():
    kw = dict(lr=1.0, warmup=10, decay_start=100, total=200, min_ratio=0.0)
    assert wsd_lr(0, **kw) == pytest.approx(0.1) and wsd_lr(9, **kw) == 1.0
    assert wsd_lr(50, **kw) == 1.0 and wsd_lr(99, **kw) == 1.0
    assert wsd_lr(150, shape="linear", **kw) == pytest.approx(0.5)
    assert wsd_lr(101, shape="linear", **kw) == pytest.approx(0.99)  # the decay begins at decay_start
    assert wsd_lr(125, shape="1-sqrt", **kw) == pytest.approx(0.5)  # 1 - sqrt(0.25)
    assert wsd_lr(150, shape="cosine", **kw) == pytest.approx(0.5)
    assert wsd_lr(200, shape="linear", **kw) == 0.0 and wsd_lr(250, shape="1-sqrt", **kw) == 0.0
    exp = dict(kw, min_ratio=0.01)
    assert wsd_lr(100, shape="exp", half_life=20, **exp) == 1.0
    assert wsd_lr(120, shape="exp", half_life=20, **exp) == pytest.approx(0.5)
    assert wsd_lr(200, shape="exp", **exp) == pytest.approx(0.01)  # default half-life reaches min_ratio
    assert wsd_lr(150, shape="linear", **dict(kw, min_ratio=0.1)) == pytest.approx(0.55)
    with pytest.raises(ValueError):
        wsd_lr(150, shape="step", **kw)


def test_configurator_overrides_and_rejects(tmp_path):
    scope = {"batch_size": 8, "lr": 1e-3, "name": "a", "phases": [1], "_private": 1}
    (tmp_path / "c.py").write_text("batch_size = 2 * batch_size\nname = 'b'\n")
    cfg = configure(scope, [str(tmp_path / "c.py"), "--lr=3", "--name=out/x"])
    assert cfg == {"batch_size": 16, "lr": 3.0, "name": "out/x", "phases": [1]}
    with pytest.raises(SystemExit, match="unknown config key"):
        configure(scope, ["--batch=3"])
    with pytest.raises(SystemExit, match="must be int"):
        configure(scope, ["--batch_size=abc"])


# ---------------------------------------------------------------------------- trainer
def make_trainer(dropout=0.1, **cfg_over):
    cfg = quiet_config(**({"batch_size": 4} | cfg_over))
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=400, max_seq_len=32, dropout=dropout)
    )
    return Trainer(model, cfg, Dist("cpu"))


def test_grad_accumulation_equals_large_batch(token_dir, tmp_path):
    data = PretrainData(token_dir, {"general": 1, "medical": 1}, seq_len=32, seed=0)
    runs = []
    for bs, accum in [(8, 1), (4, 2), (2, 4)]:
        t = make_trainer(dropout=0.0, batch_size=bs, grad_accum=accum)  # same math, only the split differs
        log = RunLog(tmp_path / f"log{bs}.jsonl")
        t.run(data, 0, 4, lambda s: 1e-3, log, tmp_path / f"c{bs}.pt")
        runs.append(([r["loss"] for r in log.records if "loss" in r], t.raw_model.state_dict()))
    for losses, state in runs[1:]:
        np.testing.assert_allclose(losses, runs[0][0], rtol=1e-5)
        # AdamW moves a weight by about lr per step whatever its gradient's size, so where a gradient is near
        # zero the summation order's noise can change that step: weights agree to a fraction of lr (1e-3)
        for k in state:
            torch.testing.assert_close(state[k], runs[0][1][k], rtol=1e-4, atol=1e-5)


def test_nan_guard_stops_without_overwriting_checkpoint(token_dir, tmp_path):
    data = PretrainData(token_dir, {"general": 1}, seq_len=32, seed=0)
    t = make_trainer()
    t.run(data, 0, 2, lambda s: 1e-3, RunLog(tmp_path / "log.jsonl"), tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with torch.no_grad():
        t.raw_model.tok_embeddings.weight[5:400] = float("nan")
    with pytest.raises(NonFiniteLoss, match="step 2; stopped: the last good checkpoint is .*ckpt.pt"):
        t.run(data, 2, 4, lambda s: 1e-3, RunLog(tmp_path / "log.jsonl"), tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    skipping = make_trainer(nan_policy="skip", max_nan_skips=5)
    with torch.no_grad():
        skipping.raw_model.tok_embeddings.weight[5:400] = float("nan")
    skipped_log = RunLog(tmp_path / "log2.jsonl")
    with pytest.raises(NonFiniteLoss, match="non-finite weights"):  # skipped steps, but never saves NaNs
        skipping.run(data, 0, 3, lambda s: 1e-3, skipped_log, tmp_path / "ckpt2.pt")
    assert sum("skipped" in r for r in skipped_log.records) == 3


def test_checkpoint_is_fp32_and_complete(token_dir, tmp_path):
    data = PretrainData(token_dir, {"general": 1}, seq_len=32, seed=0)
    t = make_trainer(dtype="bfloat16")
    t.run(data, 0, 2, lambda s: 1e-3, RunLog(tmp_path / "log.jsonl"), tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    assert {"optimizer", "scaler", "step", "phase", "data_state", "rng", "config", "model_args"} <= set(ckpt)
    assert ckpt["step"] == 2 and ckpt["dtype_trained"] == "bfloat16"


# ---------------------------------------------------------------------------- pretrain.py end to end
def test_pretrain_runs_phases_and_loss_falls(tmp_path, token_dir, tiny_tokenizer_dir):
    cli(tmp_path, token_dir, tiny_tokenizer_dir, "--learning_rate=2e-2")
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert len(losses) == 12
    assert losses[5] < losses[0] - 1.0 and losses[-1] < losses[6], losses  # phase two brings new sources
    assert (tmp_path / "one" / "ckpt.pt").is_file() and (tmp_path / "two" / "ckpt.pt").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"val/general", "val/medical", "val/guide", "val/val"} <= set(records[-1]) | set(records[-2])
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[:3] == pytest.approx([1e-2, 2e-2, 2e-2]) and lrs[-1] < lrs[6] == 2e-2  # warmup 2, decay in phase two


def test_resume_is_bit_identical(tmp_path, token_dir, tiny_tokenizer_dir):
    """N steps + resume + M steps == N + M steps, float for float (dropout on: RNG state restored)."""
    full, part = tmp_path / "full", tmp_path / "part"
    cli(full, token_dir, tiny_tokenizer_dir, "--dropout=0.1")
    cli(part, token_dir, tiny_tokenizer_dir, "--dropout=0.1", "--stop_at=9")  # a job killed by its time limit
    assert torch.load(part / "two" / "ckpt.pt", weights_only=False)["step"] == 9
    cli(part, token_dir, tiny_tokenizer_dir, "--dropout=0.1", "--init_from=resume")
    assert train_losses(part) == train_losses(full)  # exactly equal floats, all 12 steps


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, token_dir, tiny_tokenizer_dir):
    """2 gloo ranks x batch 4 == 1 process x batch 8 (same global rows, same token-mean loss).
    Tolerance 1e-5 relative: only the order of float additions differs."""
    cli(tmp_path / "one", token_dir, tiny_tokenizer_dir, "--batch_size=8")
    cli(tmp_path / "ddp", token_dir, tiny_tokenizer_dir, "--batch_size=4", "--grad_accum=1", nproc=2)
    cli(tmp_path / "ddp_accum", token_dir, tiny_tokenizer_dir, "--batch_size=2", "--grad_accum=2", nproc=2)
    one = train_losses(tmp_path / "one")
    for run in ("ddp", "ddp_accum"):
        other = train_losses(tmp_path / run)
        assert [s for s, _ in other] == [s for s, _ in one]
        np.testing.assert_allclose([loss for _, loss in other], [loss for _, loss in one], rtol=1e-5)


@pytest.mark.slow
def test_fsdp2_matches_and_resumes(tmp_path, token_dir, tiny_tokenizer_dir):
    from checkpoint import load_model

    cli(tmp_path / "one", token_dir, tiny_tokenizer_dir, "--batch_size=8")
    fsdp = tmp_path / "fsdp"
    cli(fsdp, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", nproc=2)
    np.testing.assert_allclose(
        [loss for _, loss in train_losses(fsdp)], [loss for _, loss in train_losses(tmp_path / "one")], rtol=1e-4
    )
    assert [p.name for p in (fsdp / "two").glob("ckpt.pt.dcp*")] == ["ckpt.pt.dcp-000000012"]  # this step's shards
    gathered, _ = load_model(fsdp / "two" / "ckpt.pt")  # full weights gathered for inference ...
    single, _ = load_model(tmp_path / "one" / "two" / "ckpt.pt")  # ... equal to one process's, up to summation order
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(gathered.state_dict()[name], tensor, rtol=1e-3, atol=1e-5)
    # resume the sharded checkpoint of phase one into phase two: same losses as the uninterrupted run
    expected = train_losses(fsdp)
    (fsdp / "log.jsonl").unlink()
    shutil.rmtree(fsdp / "two")
    cli(fsdp, token_dir, tiny_tokenizer_dir, "--batch_size=4", "--parallel=fsdp", "--init_from=resume", nproc=2)
    np.testing.assert_allclose([loss for _, loss in train_losses(fsdp)], [loss for _, loss in expected[6:]], rtol=1e-6)


@pytest.mark.slow
def test_two_nodes_through_the_launcher(tmp_path, token_dir, tiny_tokenizer_dir):
    """script/launch.sh with NNODES=2: two torchrun agents meeting at a c10d rendezvous, as on two
    machines; the result equals one process with the global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli(tmp_path / "one", token_dir, tiny_tokenizer_dir, "--batch_size=8")
    common = tiny_args(tmp_path / "nodes", token_dir, tiny_tokenizer_dir)
    env = {
        **os.environ,
        "SKIP_SETUP": "1",
        "NNODES": "2",
        "NPROC": "1",
        "MASTER": f"127.0.0.1:{port}",
        "RDZV_ID": f"test{port}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    nodes = [
        subprocess.Popen(
            ["bash", "script/launch.sh", "pretrain.py"] + common,
            cwd=ROOT,
            env={**env, "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    assert "world 2" in "".join(outputs)
    np.testing.assert_allclose(
        [loss for _, loss in train_losses(tmp_path / "nodes")],
        [loss for _, loss in train_losses(tmp_path / "one")],
        rtol=1e-5,
    )


def test_start_phase_from_checkpoint(tmp_path, token_dir, tiny_tokenizer_dir):
    cli(tmp_path / "a", token_dir, tiny_tokenizer_dir)
    result = cli(
        tmp_path / "b",
        token_dir,
        tiny_tokenizer_dir,
        "--start_phase=two",
        f"--init_from={tmp_path / 'a' / 'one' / 'ckpt.pt'}",
    )
    assert "starting phase two at step 6" in result.stdout
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")[6:]
    bad = cli(tmp_path / "c", token_dir, tiny_tokenizer_dir, "--start_phase=three", check=False)
    assert bad.returncode != 0 and "not a phase" in bad.stderr


# ---------------------------------------------------------------------------- bad input: refused before step 0
def run_pretrain(out_dir, token_dir, tokenizer_dir, *extra):
    """pretrain.main in this process (seconds faster than a subprocess); a SystemExit carries its one line."""
    import pretrain

    pretrain.main(tiny_args(out_dir, token_dir, tokenizer_dir, *extra))


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            [f"--phases={[{'name': 'one', 'iters': 6, 'decays': True, 'mixture': {'general': 1}}]!r}"],
            r"phases\[0\] \('one'\): unknown key\(s\) \['decays'\]",
        ),
        ([f"--phases={[{'name': 'one', 'mixture': {'general': 1}}]!r}"], r"phases\[0\] \('one'\): missing \['iters'\]"),
        (
            [f"--phases={[{'name': 'one', 'iters': 0, 'mixture': {'general': 1}}]!r}"],
            r"iters must be steps, an int >= 1",
        ),
        (
            [f"--phases={[{'name': '..', 'iters': 2, 'mixture': {'general': 1}}]!r}"],
            r"name must be a plain folder name",
        ),
        (
            [f"--phases={[{'name': 'one', 'iters': 2, 'mixture': {'../../etc': 1}}]!r}"],
            r"must be a folder name under data_dir",
        ),
        (
            [f"--phases={[DECAY_FIRST, {'name': 'b', 'iters': 2, 'mixture': {'general': 1}}]!r}"],
            r"decay phases must come last",
        ),
        (["--grad_accum=0"], r"grad_accum must be >= 1, not 0"),
        (["--batch_size=0"], r"batch_size must be >= 1, not 0"),
        (["--decay_shape=cosin"], r"decay_shape must be one of"),
        (["--learning_rate=-1.0"], r"learning_rate must be > 0"),
        (["--grad_accum=True"], r"grad_accum must be int"),
    ],
)
def test_config_mistakes_stop_before_anything_is_written(tmp_path, token_dir, tiny_tokenizer_dir, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        run_pretrain(out, token_dir, tiny_tokenizer_dir, *extra)
    assert not out.exists()


def test_a_non_finite_loss_stops_the_command_with_one_line(tmp_path, token_dir, tiny_tokenizer_dir):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"pretrain.py: \[one\] loss is (nan|inf) at step \d+; stopped: this run has "):
        run_pretrain(out, token_dir, tiny_tokenizer_dir, "--learning_rate=1e30", "--grad_clip=0.0")


def test_a_new_run_never_picks_up_an_earlier_runs_checkpoints(tmp_path, token_dir, tiny_tokenizer_dir):
    import sft

    out = tmp_path / "run"
    run_pretrain(out, token_dir, tiny_tokenizer_dir)  # phases one and two, 12 steps
    only_one = f"--phases={[PHASES[0]]!r}"
    with pytest.raises(SystemExit, match="holds an earlier run"):
        run_pretrain(out, token_dir, tiny_tokenizer_dir, only_one)
    run_pretrain(out, token_dir, tiny_tokenizer_dir, only_one, "--overwrite=True")
    assert not (out / "two").exists()  # the earlier run's later phase went aside with it
    assert len(list(tmp_path.glob("run.replaced-*/two/ckpt.pt"))) == 1
    assert sft.latest_pretrain_checkpoint(out) == out / "one" / "ckpt.pt"
    # a foreign checkpoint dropped into this run's folder is not "the latest" either
    shutil.copytree(next(tmp_path.glob("run.replaced-*/two")), out / "two")
    assert sft.latest_pretrain_checkpoint(out) == out / "one" / "ckpt.pt"


def test_token_ids_beyond_the_vocabulary_are_refused_before_step_zero(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    write_source(tmp_path, "general", [3000], tokenizer_sha256=tiny_tokenizer.fingerprint)
    shard = tmp_path / "general" / "general_0000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[1234] = tiny_tokenizer.vocab_size + 5  # one id the model cannot embed
    tokens.tofile(shard)
    phases = f"--phases={[{'name': 'one', 'iters': 2, 'mixture': {'general': 1}}]!r}"
    with pytest.raises(SystemExit, match=f"token id {tiny_tokenizer.vocab_size + 5} is beyond the model's vocabulary"):
        run_pretrain(
            tmp_path / "scanned", tmp_path, tiny_tokenizer_dir, phases
        )  # no max_token_id: the shards are scanned
    manifest = json.loads((tmp_path / "general" / "manifest.json").read_text())
    manifest["shards"][0]["max_token_id"] = int(tokens.max())
    (tmp_path / "general" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="beyond the model's vocabulary"):
        run_pretrain(tmp_path / "recorded", tmp_path, tiny_tokenizer_dir, phases)
    assert not (tmp_path / "recorded" / "one").exists()
    manifest["shards"][0]["max_token_id"] = 10  # a manifest that lies is caught at the batch that holds the id
    (tmp_path / "general" / "manifest.json").write_text(json.dumps(manifest))
    data = PretrainData(
        tmp_path, {"general": 1}, seq_len=32, seed=0, vocab_size=tiny_tokenizer.vocab_size, sampling="sequential"
    )
    with pytest.raises(DataError, match="general: a token id beyond the model's vocabulary"):
        for step in range(200):
            data.train_batches(step, 1, 8)


def test_manifest_paths_stay_in_their_folder(tmp_path):
    write_source(tmp_path, "general", [3000])
    (tmp_path / "secret.bin").write_bytes(np.arange(3000, dtype=np.uint16).tobytes())
    manifest = json.loads((tmp_path / "general" / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../secret.bin"
    (tmp_path / "general" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard '../secret.bin' is not a file name inside"):
        TokenSource(tmp_path / "general", 32)
    (tmp_path / "general" / "manifest.json").write_text('{"shards": [')  # cut short
    with pytest.raises(DataError, match=r"manifest.json is not a data_process.py manifest.*re-run data_process.py"):
        TokenSource(tmp_path / "general", 32)


def test_resume_after_a_kill_that_tore_the_last_log_line(tmp_path, token_dir, tiny_tokenizer_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    run_pretrain(full, token_dir, tiny_tokenizer_dir)
    run_pretrain(part, token_dir, tiny_tokenizer_dir, "--stop_at=9")
    with open(part / "log.jsonl", "a") as f:
        f.write('{"step": 10, "phase": "two", "lo')  # the kill came in the middle of a write
    run_pretrain(part, token_dir, tiny_tokenizer_dir, "--init_from=resume")
    assert train_losses(part) == train_losses(full)


def test_a_full_disk_at_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(
    tmp_path, token_dir, tiny_tokenizer_dir, monkeypatch
):
    out = tmp_path / "run"
    run_pretrain(out, token_dir, tiny_tokenizer_dir, "--stop_at=6")
    before = (out / "one" / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        SystemExit,
        match=r"pretrain.py: step 12: cannot write .*two/ckpt.pt: No space left on device; "
        r"nothing was replaced",
    ):
        run_pretrain(out, token_dir, tiny_tokenizer_dir, "--init_from=resume")
    assert (out / "one" / "ckpt.pt").read_bytes() == before
    assert not list(out.rglob("*.tmp"))


def test_out_dir_that_is_a_file_is_one_line(tmp_path, token_dir, tiny_tokenizer_dir):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match="out_dir .*taken is a file, not a folder"):
        run_pretrain(tmp_path / "taken", token_dir, tiny_tokenizer_dir)


def test_a_resume_already_past_stop_at_says_so(tmp_path, token_dir, tiny_tokenizer_dir, capsys):
    run_pretrain(tmp_path, token_dir, tiny_tokenizer_dir, "--stop_at=9")
    log = (tmp_path / "log.jsonl").read_text()
    capsys.readouterr()
    run_pretrain(tmp_path, token_dir, tiny_tokenizer_dir, "--init_from=resume", "--stop_at=6")
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'two' / 'ckpt.pt'} is at step 9, already at or past stop_at=6; nothing to train" in printed
    assert (tmp_path / "log.jsonl").read_text() == log


def test_a_refused_out_dir_under_torchrun_is_rank_0s_line_without_other_ranks_tracebacks(
    tmp_path, token_dir, tiny_tokenizer_dir
):
    cli(tmp_path, token_dir, tiny_tokenizer_dir, "--stop_at=2")
    result = cli(tmp_path, token_dir, tiny_tokenizer_dir, "--stop_at=2", nproc=2, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and output.count(f"{tmp_path} holds an earlier run") == 1
    assert "[rank1]" not in output and "closed by peer" not in output  # rank 1 did not die in the broadcast
