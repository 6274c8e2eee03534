"""Benchmarks that print ratios measured side by side in one run (tests never time anything).

    python bench.py train      # training tokens/s + MFU: our path (in dtype=auto's pick) vs a naive baseline
    python bench.py generate   # generation tokens/s with vs without the KV cache, time to first token
    python bench.py peak       # this machine's matmul FLOP/s (the MFU denominator on CPU)
    python bench.py vlm        # vision-language: training tokens/s with and without images, projector and
                               # tower throughput, generation with one image with and without the KV cache

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

from dataset import PretrainData
from model import IGNORE_INDEX, ModelArgs, Transformer
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
        variants.append(Variant(f"ours ({short[chosen]}) + torch.compile of the blocks", device, chosen, True, True, True))
    if chosen != "float32":
        variants.append(Variant("ours (fp32, chunked loss, fused AdamW)", device, "float32", True, True, False))
    variants.append(Variant("naive (fp32, full-logit CE, for-loop AdamW, no compile)", device, "float32", False, False,
                            False))
    return variants


def bench_train(args):
    device = torch.device(args.device)
    chosen = resolve("auto", device, "train", dim=REFERENCE["dim"])
    print(f"host: {cpu_features() if device.type == 'cpu' else torch.cuda.get_device_name(device)}; "
          f"dtype=auto picks {chosen}")
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "bench"
        shard.mkdir()
        n = 2_000_000
        np.random.default_rng(0).integers(0, REFERENCE["vocab_size"], n, dtype=np.uint16).tofile(shard / "bench_0000.bin")
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
                    (x, y), = data.train_batches(step, 1, args.batch_size)
                    data_times.append(time.perf_counter() - t)
                    x, y = x.to(device), y.to(device)
                    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    v.step(x, y)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if round_ >= args.warmup and turn_step > 0:
                        times[v.name].append(time.perf_counter() - t)
                        after = resource.getrusage(resource.RUSAGE_SELF)
                        usage[v.name].append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime,
                                              after.ru_utime - before.ru_utime))
                    step += 1
        flops_per_token = variants[0].model.flops_per_token(REFERENCE["max_seq_len"])
        print(f"reference model: {REFERENCE}, batch {args.batch_size}, {variants[0].model.num_params() / 1e6:.1f}M params, "
              f"{torch.get_num_threads()} threads on {device}")
        print("measured matmul peak: " + ", ".join(f"{d} {p / 1e12:.2f} TFLOP/s" for d, p in peak.items()))
        step_flops = tokens_per_step * flops_per_token
        step_times = {name: statistics.median(t) for name, t in times.items()}
        for v in variants:
            step_time = step_times[v.name]
            faults, system, user = (sum(column) for column in zip(*usage[v.name]))
            target = " (target >= 70%)" if v.dtype == chosen.dtype and v is not variants[-1] else ""
            print(f"  {v.name:62s} {step_time * 1000:8.1f} ms/step {tokens_per_step / step_time:9.0f} tok/s  "
                  f"MFU {step_flops / peak[v.dtype] / step_time:6.1%} of the {v.dtype} peak{target}  "
                  f"{faults / len(usage[v.name]) / 1000:5.0f}k page faults/step, "
                  f"kernel {system / (system + user):4.0%} of CPU time")
        naive = step_times[variants[-1].name]
        target = 3.0 if chosen.dtype == "bfloat16" else 1.3
        for v in variants[:-1]:
            label = v.name.split(", chunked")[0] + ("" if "compile" in v.name else ")")
            print(f"speed-up {label} / naive: {naive / step_times[v.name]:.2f}x"
                  + (f" (target >= {target}x where dtype=auto is {chosen.dtype})" if v.dtype == chosen.dtype else ""))
        at_peak = step_flops / peak[chosen.dtype]  # s/step with every FLOP a matmul at the chosen precision's peak
        print(f"bound: every FLOP as a matmul at the {chosen.dtype} peak would take {at_peak * 1000:.0f} ms/step, "
              f"{naive / at_peak:.1f}x this naive step; the naive step's kernel time (first-touch "
              "page faults of its fresh full-logit buffers) moves with the host, and the ratio with it")
        head_share = 6 * variants[0].model.output.weight.numel() / flops_per_token
        ratio = (f"bf16 matmul {peak['bfloat16'] / peak['float32']:.1f}x its fp32 matmul at 2048^3"
                 if "bfloat16" in peak and "float32" in peak else chosen.reason)
        print(f"context: this host's {ratio}; the LM head is {head_share:.0%} of the FLOPs, all matmul")
        data_time = statistics.median(data_times)
        print(f"dataloader: {data_time * 1000:.2f} ms per batch = "
              f"{data_time / step_times[variants[0].name]:.2%} of our step time (target < 5%)")


GENERATION_MODELS = {  # KV caching saves the body's work; with a 64,793 vocabulary the LM head costs the same either way
    "config/pretrain_25m.py shape (d512 L8)": dict(dim=512, n_layers=8, n_heads=8, vocab_size=64794),
    "training reference (d256 L4)": dict(REFERENCE),
}


def bench_generate(args):
    device = torch.device(args.device)
    prompt = [list(range(100, 164))]
    for label, shape in GENERATION_MODELS.items():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**dict(shape, max_seq_len=1024))).to(device).eval()
        print(f"{label}: {model.num_params() / 1e6:.1f}M params, fp32, greedy, batch 1, prompt 64 tokens, "
              f"{torch.get_num_threads()} threads on {device}")
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
            print(f"  {new} new tokens: KV cache {rows[True][0]:7.1f} tok/s (first token {rows[True][1] * 1000:.0f} ms) | "
                  f"no cache {rows[False][0]:7.1f} tok/s (first token {rows[False][1] * 1000:.0f} ms) | "
                  f"speed-up {rows[True][0] / rows[False][0]:.1f}x" + (" (target >= 5x)" if new == 512 else ""))


VLM_LLM = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64794, max_seq_len=256)  # pretrain_tiny
VLM_TOWER = dict(hidden_size=192, layers=4, heads=3, image_size=224, patch_size=16)  # ViT-Ti width, 196 patches


def vlm_model(tower_dir, pool=1, max_seq_len=VLM_LLM["max_seq_len"]):
    import vision
    from vlm import VLM, VLMArgs

    tower, preprocess = vision.load_tower(tower_dir)
    args = VLMArgs(**dict(VLM_LLM, max_seq_len=max_seq_len), vision=tower.config.to_dict(), preprocess=preprocess,
                   projector_pool=pool, image_token_id=64789)
    torch.manual_seed(0)
    return VLM(args, tower)


def vlm_batch(a, batch_size, with_image, generator):
    """Rows of max_seq_len random tokens; with an image, each row starts with it and only its text is a target."""
    x = torch.randint(3, 60000, (batch_size, a.max_seq_len), generator=generator)
    y = torch.randint(3, 60000, (batch_size, a.max_seq_len), generator=generator)
    if not with_image:
        return x, y, {}
    x[:, :a.image_tokens] = a.image_token_id
    y[:, :a.image_tokens] = IGNORE_INDEX
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
        variants = {"text only (SFT of the LLM)": (vlm_model(tower), None),
                    "align, 196 image tokens": (vlm_model(tower), "align"),
                    "instruct, 196 image tokens": (vlm_model(tower), "instruct"),
                    "instruct, pool 2: 49 image tokens": (vlm_model(tower, pool=2), "instruct")}
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
    print(f"LLM {VLM_LLM}, random CLIP tower {VLM_TOWER}; batch {args.batch_size} x {VLM_LLM['max_seq_len']} tokens, "
          f"bf16 autocast, {torch.get_num_threads()} threads on {device}")
    text, text_cpu = (statistics.median(t["text only (SFT of the LLM)"]) for t in (times, cpu_times))
    for name in variants:
        step, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        print(f"  train {name:34s} {step * 1000:7.0f} ms/step {tokens / step:6.0f} tok/s ({text / step:.2f}x text); "
              f"CPU {cpu * 1000:6.0f} ms/step ({text_cpu / cpu:.2f}x text)")

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
    print(f"  projector: {projected / statistics.median(projector[1:]):,.0f} image tokens/s "
          f"(forward); tower + projector: {pixels.shape[0] / statistics.median(tower_times[1:]):,.1f} images/s "
          f"= {image_tokens / statistics.median(tower_times[1:]):,.0f} image tokens/s")

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
    print(f"  generate after one image ({a.image_tokens} image + 20 text tokens), {args.vlm_new_tokens} new, fp32: KV "
          f"cache {rows[True][0]:.1f} tok/s (first token {rows[True][1] * 1000:.0f} ms) | no cache "
          f"{rows[False][0]:.1f} tok/s (first token {rows[False][1] * 1000:.0f} ms) | "
          f"{rows[True][0] / rows[False][0]:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "generate", "peak", "vlm"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps-per-turn", type=int, default=2, help="train: timed steps per variant per round, after one untimed")
    parser.add_argument("--gen-rounds", type=int, default=1, help="generate: runs per measurement (each is 128-512 steps)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (its cold start is ~30 s)")
    parser.add_argument("--vlm-new-tokens", type=int, default=128, help="vlm: tokens generated after the image")
    args = parser.parse_args()
    if args.what == "train":
        bench_train(args)
    elif args.what == "generate":
        bench_generate(args)
    elif args.what == "vlm":
        bench_vlm(args)
    else:
        device = torch.device(args.device)
        print(f"host: {cpu_features() if device.type == 'cpu' else torch.cuda.get_device_name(device)}")
        for name in ("float32", "bfloat16"):
            print(f"{name}: {matmul_peak(str(device), name) / 1e12:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
