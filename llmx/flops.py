"""Model FLOPs utilisation (MFU, PaLM §B): the FLOPs a training step needs by the model's arithmetic
(its family's `flops_per_token`, `llmx.models`), over what the devices could do at their bf16 peak:
the vendors' data sheets for accelerators, a measured matmul probe for CPUs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (TPU: per chip).
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def _cache_file() -> Path:
    return Path(os.environ.get("LLMX_CACHE_DIR", Path.home() / ".cache" / "llmx")) / "cpu_peak.json"


def _cpu_identity() -> str:
    """What makes two CPUs' matmul speeds differ: model name and the SIMD/matrix extensions (VMs
    report the same host name everywhere, so the host name alone would reuse another CPU's probe)."""
    model, flags = "", ""
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags":
                flags = " ".join(sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma"))))
                break
    except OSError:
        pass
    return f"{model or platform.processor()}|{flags}"


def _best_flops(fn, *args, flops: float, repeats: int) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def measure_cpu_peak(*, size: int = 2048, repeats: int = 5) -> dict:
    """This CPU backend's best bf16 x bf16 -> fp32 matmul FLOP/s (all cores), both ways XLA:CPU can
    do it: `native` (a bf16 dot, the AMX/AVX512-BF16 path where the CPU has one) and `upcast` (the
    operands converted to fp32, an fp32 dot: the same products and fp32 sums, so the same result up
    to summation order). The peak is the faster of the two."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.bfloat16), device)
    native = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    upcast = jax.jit(lambda x, y: jnp.dot(x.astype(jnp.float32), y.astype(jnp.float32)))
    flops = 2 * size**3
    result = {
        "native": _best_flops(native, a, a, flops=flops, repeats=repeats),
        "upcast": _best_flops(upcast, a, a, flops=flops, repeats=repeats),
    }
    result["flops"] = max(result["native"], result["upcast"])
    return result


# (cache file, CPU key) -> probe: every bf16 einsum asks while it is traced, so the file is read once.
_PROBES: dict[tuple[str, str], dict] = {}


def cpu_matmul_probe() -> dict:
    """The probe above, run once per CPU and cached (`LLMX_CACHE_DIR`); {'native', 'upcast', 'flops'}."""
    key = f"{_cpu_identity()}|{os.cpu_count()}|{jax.__version__}"
    path = _cache_file()
    if (str(path), key) in _PROBES:
        return _PROBES[str(path), key]
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and {"native", "upcast", "flops"} <= cached.keys():
            _PROBES[str(path), key] = cached
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    with jax.ensure_compile_time_eval():  # the first call may come while a model is being traced
        result = measure_cpu_peak()
    log.info(
        "measured CPU bf16 matmul peak: %.0f GFLOP/s (bf16 dots %.0f, fp32 dots on upcast operands %.0f; cached in %s)",
        result["flops"] / 1e9, result["native"] / 1e9, result["upcast"] / 1e9, path,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, **result}))
    _PROBES[str(path), key] = result
    return result


def cpu_peak_flops() -> float:
    """The measured CPU bf16 matmul peak (cached)."""
    return float(cpu_matmul_probe()["flops"])


def cpu_bf16_dots_upcast() -> bool:
    """Whether bf16 matmuls on this CPU are faster as fp32 dots on upcast operands (CPUs without
    AMX/AVX512-BF16: XLA:CPU's bf16 dot there is ~0.6x its fp32 dot). Upcasting must win clearly,
    so a noisy probe on a CPU with bf16 hardware keeps the native path."""
    probe = cpu_matmul_probe()
    return probe["upcast"] > 1.15 * probe["native"]


def peak_flops(devices) -> float:
    """Total bf16 peak of `devices`: the data-sheet figure per accelerator, the measured CPU peak for
    CPU devices (simulated CPU devices share one machine, so their peak is the machine's)."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        return cpu_peak_flops()
    kind = devices[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    raise KeyError(f"no peak FLOP/s known for device kind {kind!r}; add it to llmx.flops.PEAK_BF16_FLOPS")


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """The fraction of `peak` FLOP/s that `tokens_per_second` tokens of `flops_per_token` each use."""
    return tokens_per_second * flops_per_token / peak
