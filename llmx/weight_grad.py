"""The bf16 projections' weight gradient dW = X^T G on XLA:CPU by the kernel of `weight_grad_cpu.cc`.

`llmx.matmul`'s backward asks `takes(spec, dtype, w_shape)` for every einsum it differentiates; where it answers
True the weight's gradient comes from this kernel (an XLA FFI call), the input's gradient still from
XLA. It answers True only while tracing for one CPU device (the call is not partitioned: on a mesh of
several devices XLA would gather its operands), in bf16, for an einsum that is a plain (rows, K) x (K, N)
projection (`split`), on a CPU whose build has the kernel (AVX512-BF16) and where the probe below timed
it faster than XLA's own dW (a transposing copy and a bf16 dot), once per CPU and kernel source.
The kernel's file says why it exists. Same products, fp32 sums: the result matches XLA's up to the
order of the sums (tests/test_weight_grad.py).
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from llmx import mesh as mesh_lib
from llmx import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("weight_grad_cpu.cc")
WHAT = "CPU weight-gradient kernel"
TARGET = "llmx_weight_grad_cpu"
LANES = 16  # N must be a multiple of this (one 512-bit vector of fp32)


def _cache_dir() -> Path:
    return native.cache_dir("weight_grad_cpu")


@functools.cache
def _key() -> str:
    return native.key(SOURCE, native.compiler() or "")


@functools.cache
def _load() -> tuple[bool, str]:
    """Build (once per CPU and source) and register the FFI handler; (ok, reason if not)."""
    compiler = native.compiler()
    if compiler is None:
        return False, "no C++ compiler found (set CXX or install g++)"
    try:
        library = native.load(compiler, SOURCE, _cache_dir() / f"libllmx_weight_grad_cpu-{_key()}.so", what=WHAT)
        if not library.LlmxWeightGradAvailable():
            return False, "this CPU has no AVX512-BF16 instructions"
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.LlmxWeightGrad), platform="cpu")
    except (OSError, RuntimeError) as e:
        return False, f"building the {WHAT} failed: {e}"
    return True, ""


def available() -> bool:
    """Whether the kernel is built and registered on this host (building it on the first call)."""
    return _load()[0]


@functools.cache
def _note_unavailable() -> None:
    """Once per process, why bf16 weight gradients stay XLA's dots (a failed build is a warning: a
    compiler was there)."""
    reason = _load()[1]
    level = logging.WARNING if reason.startswith("building") else logging.INFO
    log.log(level, "CPU weight-gradient kernel unavailable: %s; weight gradients run as XLA dots", reason)


def split(spec: str) -> int | None:
    """For 'btd,df->btf'-like specs (x's free indices then the contracted ones, w's contracted then its
    own, the output x's free then w's): how many leading indices of w are contracted; else None."""
    inputs, out = spec.split("->")
    spec_x, spec_w = inputs.split(",")
    contracted = [c for c in spec_x if c in spec_w and c not in out]
    free_x = [c for c in spec_x if c not in spec_w]
    free_w = [c for c in spec_w if c not in spec_x]
    if not contracted or not free_w or any(c in out for c in spec_x if c in spec_w):
        return None
    ok = (spec_x == "".join(free_x + contracted) and spec_w == "".join(contracted + free_w)
          and out == "".join(free_x + free_w))
    return len(contracted) if ok else None


def weight_grad(spec: str, x, g, w_shape) -> jax.Array:
    """d(einsum(spec, x, w))/dw for cotangent g, in fp32 and w's shape: X^T G with X = x as (rows, K) and
    G = g as (rows, N), K and N the sizes of w's contracted and free indices."""
    n_contracted = split(spec)
    K, N = math.prod(w_shape[:n_contracted]), math.prod(w_shape[n_contracted:])
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((K, N), jnp.float32))(x.reshape(-1, K), g.reshape(-1, N))
    return out.reshape(w_shape)  # (K, N) -> w's own indices


def _xla_weight_grad(x, g):
    """XLA's dW of einsum('btk,kn->btn') as `llmx.matmul`'s laid-out backward asks for it: x transposed
    to (K, B, T), a bf16 dot contracting B and T (a 2-D x would have its transpose folded into the dot,
    which XLA:CPU then runs in fp32: not what a model's backward gets)."""
    return jnp.einsum("kbt,btn->kn", jnp.transpose(x, (2, 0, 1)), g, preferred_element_type=jnp.float32)


# The bench model's MLP weight gradient (configs/bench_cpu.yaml): batch 8, sequence 256, K 256, N 688.
PROBE_SHAPE = (8, 256, 256, 688)
_PROBES: dict[str, dict] = {}


def measure(*, shape=PROBE_SHAPE, rounds: int = 4, repeats: int = 5) -> dict:
    """Best seconds of dW for x (B, T, K), g (B, T, N) in bf16 by the kernel ('kernel') and by XLA ('xla'),
    timed in alternating rounds (a VM's speed drifts by tens of percent within seconds)."""
    ok, reason = _load()
    if not ok:
        raise RuntimeError(reason)
    B, T, K, N = shape
    device = jax.devices("cpu")[0]
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(kx, (B, T, K), jnp.bfloat16), device)
    g = jax.device_put(jax.random.normal(kg, (B, T, N), jnp.bfloat16), device)
    kernel = jax.jit(lambda x, g: weight_grad("btk,kn->btn", x, g, (K, N)))
    candidates = {"kernel": kernel, "xla": jax.jit(_xla_weight_grad)}
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, fn in candidates.items():
            best[name] = min(best[name], native.best_seconds(fn, x, g, repeats=repeats))
    return best


def probe() -> dict:
    """`measure()`, run once per CPU and kernel source, cached next to the library."""
    return native.cached_probe(_cache_dir() / "probe.json", _key(), {"kernel", "xla"}, lambda: measure(), _PROBES,
                               what=f"CPU weight-gradient ({'x'.join(map(str, PROBE_SHAPE))})")


def _one_device() -> bool:
    """The mesh being traced for has one device (outside a mesh a jitted call runs on one device)."""
    mesh = mesh_lib.active_mesh()
    return mesh is None or mesh.devices.size == 1


def takes(spec: str, dtype, w_shape) -> bool:
    """Whether the weight gradient of einsum(spec, x, w) in `dtype` being traced comes from the kernel."""
    if jnp.dtype(dtype) != jnp.bfloat16 or mesh_lib.traced_platform() != "cpu" or not _one_device():
        return False
    n_contracted = split(spec)
    if n_contracted is None or math.prod(w_shape[n_contracted:]) % LANES:
        return False
    if not available():
        _note_unavailable()
        return False
    times = probe()
    return times["kernel"] < times["xla"]
