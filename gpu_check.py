"""What a GPU must show before a real run, in one command: writes OUT/report.md (default out/gpu_check).

    bash script/gpu_check.sh               # on a GPU: pretrain_100m's shape, about 5-8 minutes on one H100/H200
    DEVICE=cpu bash script/gpu_check.sh    # tiny shapes on the CPU: the plumbing check the test suite runs

Items, each reported with its numbers, PASS/FAIL and the peak GPU memory it took:
  loss kernel     the chunked LM-head loss and its gradients against F.cross_entropy, fp32 and bf16
  train eager     pretrain_100m's model and config, a few dozen steps in dtype=auto: tokens/s, MFU
  train compiled  the same with compile=True (the config's setting), cold compile excluded
  fused AdamW     whether the trainer's optimizer took the fused kernel
  torchrun DDP    `torchrun --nproc_per_node=1 pretrain.py` (NCCL on a GPU): losses equal a plain process's
  torchrun FSDP2  the same with parallel=fsdp (bf16 MixedPrecisionPolicy)
  resume          N steps + resume + M steps against N+M steps: the largest loss difference, bit-exact or not
  generation      KV-cache decoding tokens/s, batch 1, against no cache
  export          export_hf.py's folder loaded by transformers on the device: largest logit difference
The pretrain.py runs use a small SentencePiece model trained on data/sample here (seconds) and random
token shards, so the check needs nothing but the repository and torch + transformers + sentencepiece.
A failing item is reported and the rest still run; the exit status is non-zero if any failed.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import export_hf
import pretrain
import train_tokenizer
from atomic import atomic_write_text
from chatglm_tokenizer import load_tokenizer
from configurator import configure
from corpora import check_out
from dataset import PretrainData
from lm_head import chunked_cross_entropy
from model import ModelArgs, Transformer
from parallel import Dist
from precision import autocast
from runlog import RunLog
from trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent
# the shapes per device: pretrain_100m's on a GPU; a model small enough for a CPU test on the CPU
SHAPES = {
    "cuda": dict(
        config="config/pretrain_100m.py",
        batch_size=16,
        steps=30,
        warmup=5,
        loss_rows=8192,
        gen_tokens=256,
        generate=dict(dim=512, n_layers=8, n_heads=8),  # pretrain_25m's shape
        tiny=["--dim=256", "--n_layers=4", "--n_heads=4", "--max_seq_len=256", "--batch_size=8"],
    ),
    "cpu": dict(
        config="config/pretrain_100m.py",
        batch_size=2,
        steps=3,
        warmup=1,
        loss_rows=512,
        gen_tokens=16,
        generate=dict(dim=64, n_layers=2, n_heads=2),
        tiny=["--dim=32", "--n_layers=2", "--n_heads=2", "--max_seq_len=32", "--batch_size=4"],
        model=["--dim=64", "--n_layers=2", "--n_heads=2", "--hidden_dim=0", "--max_seq_len=64"],
    ),
}
VOCAB = 64794  # ChatGLM2's: the LM head at its real size


def peak_memory(device):
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "-"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the items


def loss_kernel(device, shape):
    """Tolerances: fp32 is the same arithmetic in another order (loss within 1e-5 relative, gradients within
    1e-4 of their largest entry). Under bf16 autocast the matmuls' inputs are rounded to 8 bits of mantissa
    (relative error 2^-9), so the loss is checked within 1e-2 relative and the gradients within 2e-2 in
    relative L2 norm, against fp32 arithmetic on the same bf16-rounded inputs."""
    torch.manual_seed(0)
    rows, dim = shape["loss_rows"], 768 if device.type == "cuda" else 64
    hidden = torch.randn(rows, dim, device=device)
    weight = torch.randn(VOCAB, dim, device=device) * 0.02
    targets = torch.randint(0, VOCAB, (rows,), device=device)
    targets[::7] = -100
    results = []
    for dtype in ("float32", "bfloat16"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # fresh leaves per dtype
        with autocast(device, dtype):
            loss = chunked_cross_entropy(h, w, targets)
        loss.backward()
        rounded = (lambda t: t.to(torch.bfloat16).float()) if dtype == "bfloat16" else torch.clone
        h_ref, w_ref = rounded(hidden).requires_grad_(), rounded(weight).requires_grad_()
        ref = F.cross_entropy(h_ref @ w_ref.t(), targets, ignore_index=-100, reduction="sum")
        ref.backward()
        loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
        if dtype == "float32":
            grad_err = max(
                ((a.grad - b.grad).abs().max() / b.grad.abs().max()).item() for a, b in ((h, h_ref), (w, w_ref))
            )
            ok = loss_err < 1e-5 and grad_err < 1e-4
        else:
            grad_err = max(
                ((a.grad.float() - b.grad).norm() / b.grad.norm()).item() for a, b in ((h, h_ref), (w, w_ref))
            )
            ok = loss_err < 1e-2 and grad_err < 2e-2
        results.append((ok, f"{dtype}: loss rel. error {loss_err:.1e}, gradient error {grad_err:.1e}"))
    return all(ok for ok, _ in results), "; ".join(text for _, text in results)


def random_shards(folder, vocab, fingerprint, tokens=400_000, seed=0):
    """One source of random ids with the manifest data_process.py would write."""
    (folder / "random").mkdir(parents=True, exist_ok=True)
    np.random.default_rng(seed).integers(3, vocab, tokens, dtype=np.uint16).tofile(
        folder / "random" / "random_0000.bin"
    )
    manifest = {
        "name": "random",
        "tokenizer": {"sha256": fingerprint},
        "shards": [{"file": "random_0000.bin", "tokens": tokens}],
    }
    (folder / "random" / "manifest.json").write_text(json.dumps(manifest))


def training(device, shape, compiled, work):
    """pretrain.py's trainer on the 100m config (or the CPU's small model), random tokens: tokens/s and MFU."""
    argv = [
        shape["config"],
        f"--device={device.type}",
        f"--batch_size={shape['batch_size']}",
        "--grad_accum=1",
        "--progress=False",
        "--tensorboard=False",
        f"--compile={compiled}",
        "--log_interval=1",
        "--eval_interval=0",
        "--save_interval=0",
        *shape.get("model", []),
    ]
    cfg = configure(vars(pretrain), argv, TrainConfig)
    args = ModelArgs(
        dim=cfg["dim"],
        n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"] or None,
        vocab_size=VOCAB,
        hidden_dim=cfg["hidden_dim"] or None,
        max_seq_len=cfg["max_seq_len"],
    )
    random_shards(
        work / "train_tokens", VOCAB, "random", tokens=max(400_000, 40 * args.max_seq_len * shape["batch_size"])
    )
    data = PretrainData(work / "train_tokens", {"random": 1}, args.max_seq_len, seed=0)
    torch.manual_seed(0)
    trainer = Trainer(Transformer(args), cfg, Dist(device.type))
    steps = shape["steps"] + shape["warmup"]
    log = RunLog(work / f"log_{compiled}.jsonl", tensorboard=False)
    trainer.run(data, 0, steps, lambda s: 3e-4, log, work / f"ckpt_{compiled}.pt")
    records = [r for r in log.records if "tokens_per_sec" in r][shape["warmup"] :]
    tok_s = float(np.median([r["tokens_per_sec"] for r in records]))
    mfu = float(np.median([r["mfu"] for r in records]))
    fused = bool(trainer.optimizer.defaults.get("fused"))
    loss = records[-1]["loss"]
    detail = (
        f"d{args.dim} L{args.n_layers} seq {args.max_seq_len} batch {shape['batch_size']}, {trainer.precision}: "
        f"{tok_s:,.0f} tokens/s, MFU {mfu:.1%} (median of {len(records)} steps), last loss {loss:.3f}"
    )
    ok = math.isfinite(loss) and (device.type != "cuda" or mfu > 0)
    return ok, detail, fused


def tokenizer_for_runs(work):
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data" / "sample").rglob("*.txt"))]
    folder = work / "tokenizer"
    train_tokenizer.train(texts, folder, vocab_size=2000)
    return folder, load_tokenizer(folder)


def pretrain_run(device, shape, work, tokenizer_dir, out, *extra, torchrun=False):
    """pretrain.py on the tiny shape over two 4-step phases; its losses by step."""
    phases = [
        {"name": "one", "iters": 4, "mixture": {"random": 1}},
        {"name": "two", "iters": 4, "decay": True, "mixture": {"random": 1}},
    ]
    argv = [
        "pretrain.py",
        "config/pretrain_tiny.py",
        f"--data_dir={work / 'tokens'}",
        f"--out_dir={out}",
        f"--tokenizer={tokenizer_dir}",
        f"--device={device.type}",
        *shape["tiny"],
        f"--phases={phases!r}",
        "--warmup_iters=2",
        "--eval_interval=4",
        "--eval_windows=2",
        "--log_interval=1",
        "--dropout=0.0",
        "--progress=False",
        "--tensorboard=False",
        # on a CPU every process probes bf16's speed itself, and a busy host can sway one probe: the check
        # compares losses across processes, so there it fixes the precision
        f"--dtype={'auto' if device.type == 'cuda' else 'float32'}",
        *extra,
    ]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        if torchrun
        else [sys.executable]
    )
    result = subprocess.run(launcher + argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} {' '.join(extra)} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    memory = max([r.get("max_memory_gib", 0) for r in records] or [0])
    return losses, result.stdout, memory


def largest_difference(a, b):
    return max(abs(a[step] - b[step]) for step in a)


# ---------------------------------------------------------------- the report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), choices=["cuda", "cpu"])
    parser.add_argument("--out", default="out/gpu_check")
    args = parser.parse_args(argv)
    try:
        check_out(args.out, folder=True)  # the report is written last: a bad --out would waste the whole check
    except ValueError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: torch sees no GPU (a CPU build of torch?); DEVICE=cpu runs the plumbing check")
    shape = SHAPES[device.type]
    out = Path(args.out)
    rows, started = [], time.time()

    def item(name, check):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.time()
        try:
            ok, detail, *memory = check()
            memory = memory[0] if memory else peak_memory(device)
        except Exception as err:  # a failing item is reported; the others still run
            ok, detail, memory = False, f"{type(err).__name__}: {err}".splitlines()[0][:300], peak_memory(device)
            traceback.print_exc()
        rows.append((name, ok, detail, memory, time.time() - t))
        print(f"[gpu_check] {name}: {'PASS' if ok else 'FAIL'} {detail} ({time.time() - t:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fused = {}
        item("loss kernel", lambda: loss_kernel(device, shape))

        def train(compiled):
            ok, detail, fused[compiled] = training(device, shape, compiled, work)
            return ok, detail

        item("train eager", lambda: train(False))
        item("train compiled", lambda: train(True))
        item("fused AdamW", lambda: (bool(fused.get(False)), f"the trainer's AdamW: fused={fused.get(False)}"))
        tokenizer_dir, tok = tokenizer_for_runs(work)
        random_shards(work / "tokens", tok.vocab_size, tok.fingerprint)
        plain = {}

        def single():
            plain["losses"], _, memory = pretrain_run(device, shape, work, tokenizer_dir, work / "plain")
            return (
                True,
                f"{len(plain['losses'])} steps, last loss {plain['losses'][max(plain['losses'])]:.4f}",
                f"{memory:.2f} GiB" if memory else "-",
            )

        def launched(parallel):
            losses, stdout, memory = pretrain_run(
                device, shape, work, tokenizer_dir, work / parallel, f"--parallel={parallel}", torchrun=True
            )
            diff = largest_difference(plain["losses"], losses)
            # FSDP2's MixedPrecisionPolicy rounds the parameters themselves to bf16 (autocast rounds only the
            # matmuls' inputs), and GPU reductions may run in another order: bf16-sized differences
            tolerance = 1e-4 if device.type == "cpu" and parallel == "ddp" else 2e-2
            return (
                diff <= tolerance,
                (
                    f"world 1 via torchrun, losses vs a plain process: largest difference "
                    f"{diff:.1e} (tolerance {tolerance:g})"
                ),
                f"{memory:.2f} GiB" if memory else "-",
            )

        item("plain pretrain.py", single)
        item("torchrun DDP", lambda: launched("ddp"))
        item("torchrun FSDP2", lambda: launched("fsdp"))

        def resume():
            run = work / "resumed"
            pretrain_run(device, shape, work, tokenizer_dir, run, "--stop_at=6")
            losses, _, _ = pretrain_run(device, shape, work, tokenizer_dir, run, "--init_from=resume")
            diff = largest_difference(plain["losses"], losses)
            tolerance = 0.0 if device.type == "cpu" else 1e-3  # CUDA's index_add_ and SDPA backward may reorder sums
            return diff <= tolerance, (
                f"6 steps + resume + 2 vs 8 steps: largest loss difference {diff:.1e} "
                f"({'bit-exact' if diff == 0 else 'not bit-exact'}; tolerance {tolerance:g})"
            )

        item("resume", resume)

        def generation():
            torch.manual_seed(0)
            model = Transformer(ModelArgs(**shape["generate"], vocab_size=VOCAB, max_seq_len=1024)).to(device)
            model.eval()
            prompt, speed = [list(range(100, 164))], {}
            for cache in (True, False):
                list(model.stream(prompt, 4, temperature=0, use_cache=cache))  # warm-up
                synchronize(device)
                t = time.perf_counter()
                n = sum(1 for _ in model.stream(prompt, shape["gen_tokens"], temperature=0, use_cache=cache))
                synchronize(device)
                speed[cache] = n / (time.perf_counter() - t)
            size = shape["generate"]
            return True, (
                f"d{size['dim']} L{size['n_layers']}, fp32, batch 1, {shape['gen_tokens']} new tokens: KV cache "
                f"{speed[True]:.0f} tokens/s, no cache {speed[False]:.0f} tokens/s"
            )

        item("generation", generation)

        def export():
            ckpt = work / "plain" / "two" / "ckpt.pt"
            model, folder = export_hf.export(ckpt, work / "hf", tok)
            diff = export_hf.check(folder, model, device=device)
            return (
                diff < 1e-4,
                f"transformers' LlamaForCausalLM vs ours on {device.type}: largest logit difference {diff:.1e}",
            )

        item("export", export)

    failed = [name for name, ok, *_ in rows if not ok]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (plumbing check, tiny shapes)"
    lines = [
        "# GPU check",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {gpu}, torch {torch.__version__}, {time.time() - started:.0f} s in all.",
        "",
        "| item | result | measured | peak GPU memory | seconds |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {'PASS' if ok else '**FAIL**'} | {detail} | {memory} | {seconds:.0f} |"
        for name, ok, detail, memory, seconds in rows
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print(f"[gpu_check] {len(rows) - len(failed)}/{len(rows)} passed: {out / 'report.md'}")
    if failed:
        raise SystemExit(f"gpu_check.py: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
