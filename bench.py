"""Benchmarks that print ratios measured side by side in one run (tests never time anything).

    python bench.py train      # training tokens/s + MFU: our path (in dtype=auto's pick) vs a naive baseline
    python bench.py generate   # generation tokens/s with vs without the KV cache, time to first token
    python bench.py peak       # this machine's matmul FLOP/s (the MFU denominator on CPU)
    python bench.py vlm        # vision-language: training tokens/s with and without images, projector and
                               # tower throughput, generation with one image with and without the KV cache
    python bench.py serve      # batch-1 decode vs llama.cpp, then serve.py under 1-64 concurrent clients
    python bench.py lora       # training step time LoRA vs full fine-tuning at the tiny and 25m shapes; file sizes

The host may be noisy: variants run interleaved, several rounds, and the median is reported. In
`train`, each variant's turn starts with one untimed step: the first step after another variant
pays for that variant's aftermath (cold caches, the naive one's gigabytes of freed pages). Each
variant's line counts its minor page faults and the kernel's share of its CPU time: on a VM the
naive step's first-touch faults are a third of its time, and their cost moves with the host.
"""

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
from checkpoint import atomic_save, model_checkpoint
from dataset import PretrainData
from lm_head import IGNORE_INDEX
from model import ModelArgs, Transformer
from precision import autocast, cpu_features, matmul_peak, resolve
from trainer import make_optimizer

REFERENCE = dict(dim=256, n_layers=4, n_heads=4, vocab_size=64794, max_seq_len=256)  # ChatGLM2's vocabulary


class Variant:
    """One way of training the same model: its own weights, optimizer and step function."""

    def __init__(self, name, device, dtype, fused_loss, fused_adamw, compile_blocks, seed=0):
        torch.manual_seed(seed)
        self.name, self.device, self.dtype, self.fused_loss = name, device, dtype, fused_loss
        self.model = Transformer(ModelArgs(**REFERENCE)).to(device)
        if compile_blocks:
            self.model.compile_for_training()
        self.optimizer = make_optimizer(self.model, 3e-4, 0.1, (0.9, 0.95), device, fused=fused_adamw)
        if not fused_adamw:  # the naive baseline: the per-parameter for-loop implementation
            for group in self.optimizer.param_groups:
                group["foreach"] = False

    def step(self, x, y):
        with autocast(self.device, self.dtype):
            if self.fused_loss:
                loss = self.model(x, y)
            else:  # full (B*T, vocab) fp32 logits, then cross-entropy: nanoGPT / baby-llama2
                logits = self.model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def train_variants(device, chosen, compile_blocks):
    """Ours in the precision dtype=auto picks here (eager, and compiled), ours in fp32 too where that pick is
    bf16, and the naive baseline; the naive one last (its speed is the denominator)."""
    short = {"bfloat16": "bf16 autocast", "float16": "fp16 autocast", "float32": "fp32"}
    variants = [Variant(f"ours ({short[chosen]}, chunked loss, fused AdamW)", device, chosen, True, True, False)]
    if compile_blocks:
        variants.append(
            Variant(f"ours ({short[chosen]}) + torch.compile of the blocks", device, chosen, True, True, True)
        )
    if chosen != "float32":
        variants.append(Variant("ours (fp32, chunked loss, fused AdamW)", device, "float32", True, True, False))
    variants.append(
        Variant("naive (fp32, full-logit CE, for-loop AdamW, no compile)", device, "float32", False, False, False)
    )
    return variants


def bench_train(args):
    device = torch.device(args.device)
    chosen = resolve("auto", device, "train", dim=REFERENCE["dim"])
    print(
        f"host: {cpu_features() if device.type == 'cpu' else torch.cuda.get_device_name(device)}; "
        f"dtype=auto picks {chosen}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "bench"
        shard.mkdir()
        n = 2_000_000
        np.random.default_rng(0).integers(0, REFERENCE["vocab_size"], n, dtype=np.uint16).tofile(
            shard / "bench_0000.bin"
        )
        manifest = {"tokenizer": {"sha256": "random tokens"}, "shards": [{"file": "bench_0000.bin", "tokens": n}]}
        (shard / "manifest.json").write_text(json.dumps(manifest))
        data = PretrainData(tmp, {"bench": 1}, REFERENCE["max_seq_len"], seed=0)
        variants = train_variants(device, chosen.dtype, not args.no_compile)
        # the peak of every precision a variant runs in (bf16's is not measured where bf16 is the slow fallback:
        # 2048^3 would take seconds there, and no variant uses it)
        peak = {dtype: matmul_peak(str(device), dtype) for dtype in dict.fromkeys(v.dtype for v in variants)}
        tokens_per_step = args.batch_size * REFERENCE["max_seq_len"]
        times = {v.name: [] for v in variants}
        usage = {v.name: [] for v in variants}  # (minor page faults, kernel CPU s, user CPU s) per timed step
        data_times = []
        step = 0
        for round_ in tqdm(range(args.warmup + args.rounds), desc="bench train rounds", leave=False):
            for v in variants:
                for turn_step in range(1 + args.steps_per_turn):
                    t = time.perf_counter()
                    ((x, y),) = data.train_batches(step, 1, args.batch_size)
                    data_times.append(time.perf_counter() - t)
                    x, y = x.to(device), y.to(device)
                    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    v.step(x, y)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if round_ >= args.warmup and turn_step > 0:
                        times[v.name].append(time.perf_counter() - t)
                        after = resource.getrusage(resource.RUSAGE_SELF)
                        usage[v.name].append(
                            (
                                after.ru_minflt - before.ru_minflt,
                                after.ru_stime - before.ru_stime,
                                after.ru_utime - before.ru_utime,
                            )
                        )
                    step += 1
        flops_per_token = variants[0].model.flops_per_token(REFERENCE["max_seq_len"])
        print(
            f"reference model: {REFERENCE}, batch {args.batch_size}, "
            f"{variants[0].model.num_params() / 1e6:.1f}M params, "
            f"{torch.get_num_threads()} threads on {device}"
        )
        print("measured matmul peak: " + ", ".join(f"{d} {p / 1e12:.2f} TFLOP/s" for d, p in peak.items()))
        step_flops = tokens_per_step * flops_per_token
        step_times = {name: statistics.median(t) for name, t in times.items()}
        for v in variants:
            step_time = step_times[v.name]
            faults, system, user = (sum(column) for column in zip(*usage[v.name]))
            target = " (target >= 70%)" if v.dtype == chosen.dtype and v is not variants[-1] else ""
            print(
                f"  {v.name:62s} {step_time * 1000:8.1f} ms/step {tokens_per_step / step_time:9.0f} tok/s  "
                f"MFU {step_flops / peak[v.dtype] / step_time:6.1%} of the {v.dtype} peak{target}  "
                f"{faults / len(usage[v.name]) / 1000:5.0f}k page faults/step, "
                f"kernel {system / (system + user):4.0%} of CPU time"
            )
        naive = step_times[variants[-1].name]
        target = 3.0 if chosen.dtype == "bfloat16" else 1.3
        for v in variants[:-1]:
            label = v.name.split(", chunked")[0] + ("" if "compile" in v.name else ")")
            print(
                f"speed-up {label} / naive: {naive / step_times[v.name]:.2f}x"
                + (f" (target >= {target}x where dtype=auto is {chosen.dtype})" if v.dtype == chosen.dtype else "")
            )
        at_peak = step_flops / peak[chosen.dtype]  # s/step with every FLOP a matmul at the chosen precision's peak
        print(
            f"bound: every FLOP as a matmul at the {chosen.dtype} peak would take {at_peak * 1000:.0f} ms/step, "
            f"{naive / at_peak:.1f}x this naive step; the naive step's kernel time (first-touch "
            "page faults of its fresh full-logit buffers) moves with the host, and the ratio with it"
        )
        head_share = 6 * variants[0].model.tok_embeddings.weight.numel() / flops_per_token
        ratio = (
            f"bf16 matmul {peak['bfloat16'] / peak['float32']:.1f}x its fp32 matmul at 2048^3"
            if "bfloat16" in peak and "float32" in peak
            else chosen.reason
        )
        print(f"context: this host's {ratio}; the LM head is {head_share:.0%} of the FLOPs, all matmul")
        data_time = statistics.median(data_times)
        print(
            f"dataloader: {data_time * 1000:.2f} ms per batch = "
            f"{data_time / step_times[variants[0].name]:.2%} of our step time (target < 5%)"
        )


# KV caching saves the body's work; with a 64,793 vocabulary the LM head costs the same either way
GENERATION_MODELS = {
    "config/pretrain_25m.py shape (d512 L8)": dict(dim=512, n_layers=8, n_heads=8, vocab_size=64794),
    "training reference (d256 L4)": dict(REFERENCE),
}


def bench_generate(args):
    device = torch.device(args.device)
    prompt = [list(range(100, 164))]
    for label, shape in GENERATION_MODELS.items():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**dict(shape, max_seq_len=1024))).to(device).eval()
        print(
            f"{label}: {model.num_params() / 1e6:.1f}M params, fp32, greedy, batch 1, prompt 64 tokens, "
            f"{torch.get_num_threads()} threads on {device}"
        )
        for new in (128, 512):
            rows = {}
            for use_cache in (True, False):
                times, ttft = [], []
                for _ in range(args.gen_rounds):
                    t = time.perf_counter()
                    stream = model.stream(prompt, new, temperature=0, use_cache=use_cache)
                    next(stream)
                    ttft.append(time.perf_counter() - t)
                    n = 1 + sum(1 for _ in stream)
                    times.append(time.perf_counter() - t)
                rows[use_cache] = (n / statistics.median(times), statistics.median(ttft))
            print(
                f"  {new} new tokens: KV cache {rows[True][0]:7.1f} tok/s "
                f"(first token {rows[True][1] * 1000:.0f} ms) | "
                f"no cache {rows[False][0]:7.1f} tok/s (first token {rows[False][1] * 1000:.0f} ms) | "
                f"speed-up {rows[True][0] / rows[False][0]:.1f}x" + (" (target >= 5x)" if new == 512 else "")
            )


VLM_LLM = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64794, max_seq_len=256)  # pretrain_tiny
VLM_TOWER = dict(hidden_size=192, layers=4, heads=3, image_size=224, patch_size=16)  # ViT-Ti width, 196 patches


def vlm_model(tower_dir, pool=1, max_seq_len=VLM_LLM["max_seq_len"]):
    import vision
    from vlm import VLM, VLMArgs

    tower, preprocess = vision.load_tower(tower_dir)
    args = VLMArgs(
        **dict(VLM_LLM, max_seq_len=max_seq_len),
        vision=tower.config.to_dict(),
        preprocess=preprocess,
        projector_pool=pool,
        image_token_id=64789,
    )
    torch.manual_seed(0)
    return VLM(args, tower)


def vlm_batch(a, batch_size, with_image, generator):
    """Rows of max_seq_len random tokens; with an image, each row starts with it and only its text is a target."""
    x = torch.randint(3, 60000, (batch_size, a.max_seq_len), generator=generator)
    y = torch.randint(3, 60000, (batch_size, a.max_seq_len), generator=generator)
    if not with_image:
        return x, y, {}
    x[:, : a.image_tokens] = a.image_token_id
    y[:, : a.image_tokens] = IGNORE_INDEX
    size = a.vision["image_size"]
    return x, y, {"images": torch.randn(batch_size, 3, size, size, generator=generator)}


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_vlm(args):
    """Training steps: the LLM alone on text (SFT) vs the align and instruct stages with one image a row; the
    projector's and the tower's throughput; generation after one image with and without the KV cache. Each
    training line also gives the process's CPU time per step: other jobs on a shared host disturb it less
    than the wall time."""
    import vision
    from vlm import set_trainable

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tower = vision.save_random_tower(Path(tmp) / "tower", "clip", **VLM_TOWER)
        variants = {
            "text only (SFT of the LLM)": (vlm_model(tower), None),
            "align, 196 image tokens": (vlm_model(tower), "align"),
            "instruct, 196 image tokens": (vlm_model(tower), "instruct"),
            "instruct, pool 2: 49 image tokens": (vlm_model(tower, pool=2), "instruct"),
        }
        generator_model = vlm_model(tower, max_seq_len=512).to(device).eval()
    steps = {}
    for name, (model, stage) in variants.items():
        if stage:
            set_trainable(model, stage)
        trained = model if stage else model.llm
        steps[name] = (trained.to(device), make_optimizer(trained, 3e-4, 0.0, (0.9, 0.95), device), model.args, stage)
    generator = torch.Generator().manual_seed(0)
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for round_ in range(args.warmup + args.rounds):
        for name, (model, optimizer, a, stage) in steps.items():
            x, y, extras = vlm_batch(a, args.batch_size, stage is not None, generator)
            extras = {k: v.to(device) for k, v in extras.items()}
            t, cpu = time.perf_counter(), cpu_seconds()
            with autocast(device, "bfloat16"):
                loss = model(x.to(device), y.to(device), reduction="sum", **extras)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(cpu_seconds() - cpu)
    tokens = args.batch_size * VLM_LLM["max_seq_len"]
    print(
        f"LLM {VLM_LLM}, random CLIP tower {VLM_TOWER}; batch {args.batch_size} x {VLM_LLM['max_seq_len']} tokens, "
        f"bf16 autocast, {torch.get_num_threads()} threads on {device}"
    )
    text, text_cpu = (statistics.median(t["text only (SFT of the LLM)"]) for t in (times, cpu_times))
    for name in variants:
        step, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        print(
            f"  train {name:34s} {step * 1000:7.0f} ms/step {tokens / step:6.0f} tok/s ({text / step:.2f}x text); "
            f"CPU {cpu * 1000:6.0f} ms/step ({text_cpu / cpu:.2f}x text)"
        )

    model = steps["instruct, 196 image tokens"][0].eval()
    features = torch.randn(64, model.args.image_tokens, VLM_TOWER["hidden_size"], device=device)
    pixels = torch.randn(16, 3, VLM_TOWER["image_size"], VLM_TOWER["image_size"], device=device)
    projector, tower_times = [], []
    with torch.no_grad(), autocast(device, "bfloat16"):
        for _ in range(args.rounds + 1):
            t = time.perf_counter()
            model.projector(features)
            projector.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.image_features(pixels)
            tower_times.append(time.perf_counter() - t)
    image_tokens = pixels.shape[0] * model.args.image_tokens
    projected = features.shape[0] * features.shape[1]
    print(
        f"  projector: {projected / statistics.median(projector[1:]):,.0f} image tokens/s "
        f"(forward); tower + projector: {pixels.shape[0] / statistics.median(tower_times[1:]):,.1f} images/s "
        f"= {image_tokens / statistics.median(tower_times[1:]):,.0f} image tokens/s"
    )

    a = generator_model.args
    prompt = [[a.image_token_id] * a.image_tokens + list(range(100, 120))]
    image = torch.randn(1, 3, VLM_TOWER["image_size"], VLM_TOWER["image_size"], device=device)
    rows = {}
    for use_cache in (True, False):
        t = time.perf_counter()
        stream = generator_model.stream(prompt, args.vlm_new_tokens, images=image, temperature=0, use_cache=use_cache)
        next(stream)
        first = time.perf_counter() - t
        n = 1 + sum(1 for _ in stream)
        rows[use_cache] = (n / (time.perf_counter() - t), first)
    print(
        f"  generate after one image ({a.image_tokens} image + 20 text tokens), {args.vlm_new_tokens} new, fp32: KV "
        f"cache {rows[True][0]:.1f} tok/s (first token {rows[True][1] * 1000:.0f} ms) | no cache "
        f"{rows[False][0]:.1f} tok/s (first token {rows[False][1] * 1000:.0f} ms) | "
        f"{rows[True][0] / rows[False][0]:.1f}x"
    )


SERVE_SHAPE = dict(dim=512, n_layers=8, n_heads=8, max_seq_len=512)  # config/pretrain_25m.py; vocab: the tokenizer's
SERVE_PROMPT = "高血压患者饮食上要注意什么？请详细说明。"


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def bench_serve(args):
    """Batch-1 decode of ours beside llama.cpp on the same exported model, then serve.py under 1, 4, 16
    and 64 concurrent streaming clients on loopback. Random weights of the pretrain_25m shape, greedy,
    end of text ignored: every request decodes --serve-tokens tokens."""
    import asyncio
    import os
    import socket
    import subprocess
    import sys
    import threading

    import httpx

    from chatglm_tokenizer import load_tokenizer
    from checkpoint import atomic_save, model_checkpoint
    from engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=tok.vocab_size, **SERVE_SHAPE)).eval().to(getattr(torch, args.serve_dtype))
    prompt, steps, threads = tok.encode_batch([SERVE_PROMPT])[0], args.serve_tokens, torch.get_num_threads()
    print(
        f"model: pretrain_25m shape {SERVE_SHAPE}, vocab {tok.vocab_size}, {model.num_params() / 1e6:.1f}M params, "
        f"{args.serve_dtype}, {threads} threads; prompt {len(prompt)} tokens, {steps} greedy tokens a request"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt.pt"
        atomic_save(model_checkpoint(model, model.args, phase="sft", tokenizer_fingerprint=tok.fingerprint), ckpt)

        # ---- batch 1, side by side: llama.cpp, our engine, model.generate ----
        def engine_run():
            done, tokens = threading.Event(), []
            engine.submit(
                prompt,
                steps,
                lambda kind, value: tokens.append(value) if kind == "token" else done.set(),
                temperature=0,
            )
            done.wait()
            return tokens

        plain = Transformer(model.args).eval().to(model.tok_embeddings.weight.dtype)  # as chat.py loads it
        plain.load_state_dict(model.state_dict())
        engine = Engine(model, eos_id=-1, max_batch=1).start()  # -1: no end of text, every run is `steps` long
        runs = {
            "ours: engine (serve.py's decoder)": engine_run,
            "ours: model.generate (chat.py, eval.py)": lambda: plain.generate([prompt], steps, temperature=0)[0],
        }
        llama = llama_cpp_runner(args, ckpt, tok, Path(tmp), prompt, steps, threads)
        if llama is not None:
            runs = {"llama.cpp (llama-cpp-python)": llama, **runs}
        rates, outputs = {name: [] for name in runs}, {}
        for run in runs.values():  # untimed: first touches of the weights (llama.cpp maps its file lazily)
            run()
        for _ in range(args.serve_rounds):
            for name, run in runs.items():
                t = time.perf_counter()
                outputs[name] = run()
                rates[name].append(len(outputs[name]) / (time.perf_counter() - t))
        engine.stop()
        print(f"batch-1 decode, {steps} tokens, {args.serve_rounds} interleaved rounds (median [range]):")
        for name, r in rates.items():
            print(f"  {name:42s} {statistics.median(r):7.1f} tok/s [{min(r):.1f}-{max(r):.1f}]")
        ours_one = statistics.median(rates["ours: engine (serve.py's decoder)"])
        if llama is not None:
            same = outputs["llama.cpp (llama-cpp-python)"] == outputs["ours: engine (serve.py's decoder)"]
            llama_one = statistics.median(rates["llama.cpp (llama-cpp-python)"])
            print(f"  ours / llama.cpp: {ours_one / llama_one:.2f}x (target >= 0.5); same greedy tokens: {same}")

        # ---- the server under concurrent clients ----
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("serve.py")),
                "--ckpt",
                str(ckpt),
                "--tokenizer",
                str(args.tokenizer),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--dtype",
                args.serve_dtype,
                "--max-batch",
                str(args.serve_slots),
                "--max-queue",
                "64",
            ],
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/health")
                    break
                except httpx.TransportError:
                    assert server.poll() is None, "serve.py exited"
                    time.sleep(0.1)
            body = {
                "prompt": SERVE_PROMPT,
                "max_tokens": steps,
                "temperature": 0,
                "repetition_penalty": 1.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            rows = {}
            for clients in (1, 4, 16, 64):
                rows[clients] = asyncio.run(serve_load(url, body, clients, args.serve_seconds))
            slots = args.serve_slots
            print(
                f"serve.py, {slots} slots, queue 64, {args.serve_seconds} s per row (requests started in time run to "
                f"the end), loopback, the clients in this process:"
            )
            print(
                f"  {'clients':>7s} {'requests':>8s} {'errors':>6s} {'TTFT p50 / p99 ms':>18s} "
                f"{'per-token p50 / p99 ms':>23s} {'tokens/s':>9s}"
            )
            for clients, row in rows.items():
                print(
                    f"  {clients:7d} {row['served']:8d} {row['errors']:6d} {row['ttft50']:8.0f} / "
                    f"{row['ttft99']:6.0f}  {row['tok50']:11.1f} / {row['tok99']:7.1f} {row['rate']:9.1f}"
                )
            print(f"  16 clients / 1 client: {rows[16]['rate'] / rows[1]['rate']:.1f}x (target >= 4x)")
            if llama is not None:
                print(f"  16 clients / llama.cpp batch 1: {rows[16]['rate'] / llama_one:.1f}x (target >= 2x)")
        finally:
            server.terminate()
            server.wait()


def llama_cpp_runner(args, ckpt, tok, tmp, prompt, steps, threads):
    """A function decoding `steps` greedy tokens with llama.cpp on our export of `ckpt`, or None (said why)."""
    import subprocess
    import sys

    import export_hf

    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python to compare)")
        return None
    converter = Path(args.llama_cpp_src or ".") / "convert_hf_to_gguf.py"
    if not converter.is_file():
        print(f"llama.cpp: skipped (no {converter}: pass --llama-cpp-src, a llama.cpp source tree)")
        return None
    export_hf.export(ckpt, tmp / "hf", tok, args.serve_dtype)
    gguf = tmp / "model.gguf"
    outtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[args.serve_dtype]
    subprocess.run(
        [sys.executable, str(converter), str(tmp / "hf"), "--outtype", outtype, "--outfile", str(gguf)],
        check=True,
        capture_output=True,
    )
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=SERVE_SHAPE["max_seq_len"],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run():
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == steps:
                return out

    return run


async def serve_load(url, body, clients, seconds):
    """`clients` concurrent streaming clients, each sending its next request when the last one ends,
    for `seconds`: requests served, errors, time to first token, per-token latency, aggregate tokens/s."""
    import asyncio

    import httpx

    ttft, per_token, counts = [], [], {"served": 0, "errors": 0, "tokens": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client(deadline):
            while time.perf_counter() < deadline:
                start, first, last, tokens = time.perf_counter(), None, None, 0
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        if response.status_code != 200:
                            await response.aread()
                            counts["errors"] += 1
                            continue
                        async for line in response.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            if event.get("usage"):
                                tokens = event["usage"]["completion_tokens"]
                            elif event["choices"][0]["text"]:
                                last = time.perf_counter()
                                first = first or last
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                counts["served"] += 1
                counts["tokens"] += tokens
                ttft.append(first - start)
                per_token.append((last - first) / max(tokens - 1, 1))

        await one_client(time.perf_counter())  # nothing timed: the server's first request
        begin = time.perf_counter()
        await asyncio.gather(*(one_client(begin + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - begin
    return {
        **counts,
        "rate": counts["tokens"] / elapsed,
        "ttft50": 1000 * percentile(ttft, 50),
        "ttft99": 1000 * percentile(ttft, 99),
        "tok50": 1000 * percentile(per_token, 50),
        "tok99": 1000 * percentile(per_token, 99),
    }


LORA_SHAPES = {  # ChatGLM2's vocabulary, as training would have it; (shape, batch)
    "config/pretrain_tiny.py shape (d128 L4, GQA 4/2, seq 256)": (
        dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64794, max_seq_len=256),
        8,
    ),
    "config/pretrain_25m.py shape (d512 L8, seq 512)": (
        dict(dim=512, n_layers=8, n_heads=8, vocab_size=64794, max_seq_len=512),
        4,
    ),
}


def lora_variant(shape, rank, device):
    """(model, optimizer) for full fine-tuning (rank 0) or LoRA of rank `rank` on every linear layer of the blocks."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**shape))
    if rank:
        lora.add_adapters(model, rank, 2.0 * rank, 0.05)
    model.to(device).train()
    return model, make_optimizer(model, 1e-4, 0.0, (0.9, 0.95), device)


def lora_file_sizes(full_model, full_optimizer, lora_model, lora_optimizer, settings):
    """Bytes on disk: a full fine-tuning checkpoint, a LoRA run's checkpoint, the LoRA adapter folder."""
    with tempfile.TemporaryDirectory() as tmp:
        full, part = Path(tmp) / "full.pt", Path(tmp) / "lora.pt"
        atomic_save(model_checkpoint(full_model, full_model.args, optimizer=full_optimizer.state_dict()), full)
        atomic_save(model_checkpoint(lora_model, lora_model.args, True, optimizer=lora_optimizer.state_dict()), part)
        folder = lora.save_adapter(lora_model, Path(tmp) / "adapter", settings, {})
        return {
            "full checkpoint (weights + AdamW)": full.stat().st_size,
            "LoRA checkpoint (adapters + AdamW)": part.stat().st_size,
            "LoRA adapter folder (PEFT)": sum(f.stat().st_size for f in folder.iterdir()),
        }


def bench_lora(args):
    device = torch.device(args.device)
    print(
        f"host: {cpu_features() if device.type == 'cpu' else torch.cuda.get_device_name(device)}; "
        f"{torch.get_num_threads()} threads; LoRA rank {args.lora_rank} on wq,wk,wv,wo,w1,w2,w3; AdamW"
    )
    for label, (shape, batch) in LORA_SHAPES.items():
        chosen = resolve("auto", device, "train", dim=shape["dim"])
        adapted = f"LoRA r{args.lora_rank}"
        variants = {"full": lora_variant(shape, 0, device), adapted: lora_variant(shape, args.lora_rank, device)}
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, shape["vocab_size"], (batch, shape["max_seq_len"]), generator=g).to(device)
        times, cpu = {name: [] for name in variants}, {name: [] for name in variants}
        for round_ in tqdm(range(args.warmup + args.rounds), desc=f"bench lora {shape['dim']}", leave=False):
            for name, (model, optimizer) in variants.items():  # interleaved: both see the same host load
                for turn_step in range(1 + args.steps_per_turn):
                    t, c = time.perf_counter(), cpu_seconds()
                    with autocast(device, chosen.dtype):
                        loss = model(x, x)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if round_ >= args.warmup and turn_step > 0:
                        times[name].append(time.perf_counter() - t)
                        cpu[name].append(cpu_seconds() - c)
        settings = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "dropout": 0.05, "targets": lora.TARGETS}
        sizes = lora_file_sizes(*variants["full"], *variants[adapted], settings)
        trained = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _) in variants.items()}
        median = {name: statistics.median(t) for name, t in times.items()}
        cpu_median = {name: statistics.median(c) for name, c in cpu.items()}
        tokens = batch * shape["max_seq_len"]
        print(f"{label}: {variants['full'][0].num_params() / 1e6:.1f}M parameters, batch {batch}, dtype {chosen.dtype}")
        for name in variants:
            low, high = min(times[name]) * 1000, max(times[name]) * 1000
            print(
                f"  {name:10s} {trained[name] / 1e6:8.3f}M trained  {median[name] * 1000:8.1f} ms/step "
                f"(range {low:.0f}-{high:.0f}) {tokens / median[name]:7.0f} tok/s, CPU {cpu_median[name] * 1000:.0f} ms"
            )
        # CPU time per step moves less than wall time when other jobs share the cores
        print(
            f"  step time LoRA / full: {median[adapted] / median['full']:.2f} wall, "
            f"{cpu_median[adapted] / cpu_median['full']:.2f} CPU"
        )
        for name, size in sizes.items():
            print(f"  {name:36s} {size / 2**20:9.2f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "generate", "peak", "vlm", "serve", "lora"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--steps-per-turn", type=int, default=2, help="train: timed steps per variant per round, after one untimed"
    )
    parser.add_argument(
        "--gen-rounds", type=int, default=1, help="generate: runs per measurement (each is 128-512 steps)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (its cold start is ~30 s)")
    parser.add_argument("--lora-rank", type=int, default=8, help="lora: the adapters' rank")
    parser.add_argument("--vlm-new-tokens", type=int, default=128, help="vlm: tokens generated after the image")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="serve: the served model's tokenizer")
    parser.add_argument("--serve-dtype", default="float32", choices=["float32", "bfloat16"], help="serve: weights")
    parser.add_argument("--serve-tokens", type=int, default=128, help="serve: new tokens a request")
    parser.add_argument("--serve-seconds", type=float, default=20, help="serve: length of each concurrency row")
    parser.add_argument("--serve-slots", type=int, default=16, help="serve: serve.py --max-batch")
    parser.add_argument("--serve-rounds", type=int, default=3, help="serve: batch-1 rounds, interleaved")
    parser.add_argument("--llama-cpp-src", help="serve: a llama.cpp source tree (convert_hf_to_gguf.py)")
    parser.add_argument(
        "--threads", type=int, help="serve: threads of ours, the server's and llama.cpp's (default: torch's)"
    )
    args = parser.parse_args()
    if args.what == "serve":
        bench_serve(args)
    elif args.what == "train":
        bench_train(args)
    elif args.what == "generate":
        bench_generate(args)
    elif args.what == "vlm":
        bench_vlm(args)
    elif args.what == "lora":
        bench_lora(args)
    else:
        device = torch.device(args.device)
        print(f"host: {cpu_features() if device.type == 'cpu' else torch.cuda.get_device_name(device)}")
        for name in ("float32", "bfloat16"):
            print(f"{name}: {matmul_peak(str(device), name) / 1e12:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
