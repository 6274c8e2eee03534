"""Which floating-point precision to compute in, decided by evidence from this machine: the one resolver
that training, chat, eval, export and the benchmarks use.

    from precision import resolve
    choice = resolve("auto", torch.device("cpu"), "train", dim=512)
    choice.dtype   # "bfloat16" or "float32" (or "float16" on a GPU without bf16)
    choice.reason  # "auto: bf16 matmul 2.8x faster than fp32 on this CPU"

Why a probe. A CPU's bf16 matmul speed ranges over two orders of magnitude: with AMX (Xeon Sapphire Rapids
and later) it is 3-7x fp32, with AVX512-BF16 (AMD Zen 4) about 2-3x, and with AVX2 alone (Zen 2/3, most
laptops, older Xeons) oneDNN falls back to a reference kernel 40-170x SLOWER than fp32. CPU flags say what
the silicon has, not what this torch build does with it, so `auto` times a bf16 and an fp32 matmul of the
model's shape (a few milliseconds; cached per process) and takes bf16 only where it is faster. The CPU's
flags are printed beside the verdict. On a GPU, bf16 is taken where the device supports it.
"""

import contextlib
import functools
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)
BF16_MARGIN = 1.1  # bf16 must beat fp32 by this factor: a tie is not worth bf16's rounding
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide bf16 matmul speed on x86


@dataclass(frozen=True)
class Precision:
    dtype: str  # a key of DTYPES
    reason: str  # why, for the start-up line

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def __str__(self):
        return f"{self.dtype} ({self.reason})"


def cpu_features():
    """The bf16-relevant flags of this CPU (Linux /proc/cpuinfo), or the machine name elsewhere."""
    try:
        flags = set(
            next(
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith(("flags", "Features"))
            )
            .split(":", 1)[1]
            .split()
        )
    except (OSError, StopIteration):
        return platform.machine() or "unknown CPU"
    found = [f for f in CPU_FLAGS if f in flags]
    return " ".join(found) if found else "none of " + " ".join(CPU_FLAGS)


def _random(*shape, device="cpu", dtype=torch.float32):
    """Probe operands from a private generator: the global RNG belongs to training (dropout, resume)."""
    generator = torch.Generator(device).manual_seed(0)
    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def _best_time(a, b, repeats):
    a @ b  # the first call pays for kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def bf16_speedup(rows, dim, cols):
    """fp32 time / bf16 time of a (rows, dim) @ (dim, cols) matmul on this CPU: > 1 where bf16 is faster.
    A small square product first: where bf16 is the slow fallback that alone shows it, for ~50 ms,
    before the model-shaped product would cost seconds. Each time is the best of 3 runs."""
    a, b = _random(256, 256), _random(256, 256)
    small = _best_time(a, b, 3) / _best_time(a.bfloat16(), b.bfloat16(), 3)
    if small < 0.5:  # the fallback is 40-170x slower: far below what noise on a busy host can fake
        return small
    a, b = _random(rows, dim), _random(dim, cols)
    return _best_time(a, b, 3) / _best_time(a.bfloat16(), b.bfloat16(), 3)


def probe_shape(purpose, dim, vocab=None):
    """The matmul that stands for a step: a chunk of the LM head (training, scoring), or one decoding row
    against the whole head (generation), which is where most of a small model's time goes."""
    if purpose == "generate":
        return 1, dim, vocab or 32768
    return 512, dim, 2048


def _speed_words(factor):
    if factor >= 1:
        return f"{factor:.1f}x faster than"
    slower = 1 / factor  # a decimal where it is near 1 (a "1x slower" reads as a tie)
    return f"{slower:.1f}x slower than" if slower < 10 else f"{slower:.0f}x slower than"


_warned_slow_bf16 = False


def resolve(name, device, purpose="train", dim=512, vocab=None, speedup=None):
    """The Precision for dtype `name` ("auto" or a DTYPES key) on `device`, for `purpose`: "train" (autocast,
    fp32 master weights), "score" (eval's batched forwards) or "generate" (decoding a row at a time).
    speedup: fp32/bf16 matmul time ratio to use instead of measuring (tests inject it)."""
    if name not in CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, not {name!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if name != "auto":
            return Precision(name, "as asked")
        if torch.cuda.is_bf16_supported():
            return Precision("bfloat16", "auto: this GPU supports bf16")
        if purpose == "train":
            return Precision("float16", "auto: no bf16 on this GPU; fp16 with a gradient scaler")
        # fp16 activations of a model trained in bf16 can overflow; fp32 weights are safe everywhere
        return Precision("float32", "auto: no bf16 on this GPU")
    if device.type != "cpu" or name in ("float32", "float16"):
        return Precision("float32" if name == "auto" else name, "as asked" if name != "auto" else "auto")
    factor = speedup if speedup is not None else bf16_speedup(*probe_shape(purpose, dim, vocab))
    verdict = f"bf16 matmul {_speed_words(factor)} fp32 on this CPU"
    if name == "bfloat16":
        global _warned_slow_bf16
        if factor < 1 and not _warned_slow_bf16:
            _warned_slow_bf16 = True
            warnings.warn(
                f"dtype bfloat16 as asked, but {verdict} ({cpu_features()}); dtype=auto would pick float32",
                stacklevel=2,
            )
        return Precision("bfloat16", f"as asked; {verdict}")
    return Precision("bfloat16" if factor >= BF16_MARGIN else "float32", f"auto: {verdict}")


CUDA_PEAK_FLOPS = 989e12  # H100/H200 SXM, dense bf16 tensor cores: the MFU denominator on GPUs


@functools.lru_cache(maxsize=None)
def matmul_peak(device, dtype, n=2048, repeats=5):
    """FLOP/s of this device's best n^3 matmul in `dtype` (a DTYPES key): the MFU denominator on CPUs, where
    no datasheet number applies (the 2 cores of a VM, a laptop's turbo)."""
    device = torch.device(device)
    a = _random(n, n, device=device, dtype=DTYPES[dtype])
    b = _random(n, n, device=device, dtype=DTYPES[dtype])
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def autocast(device, dtype):
    """The autocast context for exactly the dtype given (float32: none)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype])
