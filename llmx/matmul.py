"""Matmuls in the compute dtype with fp32 accumulation, and the CPU probe that picks how bf16 dots run.

`einsum`: operands in the compute dtype, products accumulated in fp32 (`preferred_element_type`).
In bf16/fp16 the backward dots get a custom VJP: the fp32 cotangent is cast to the compute dtype
first (otherwise XLA upcasts every backward dot to fp32 and bf16 trains at fp32 speed), and the
operands are laid out (batch, free, contracted) x (batch, contracted, free), the layouts XLA:CPU
sends to its AMX bf16 path (DESIGN §6). fp32 takes the same custom VJP on CPU, where the explicit
layouts made the bench model's fp32 step 1.16x faster (Zen 4, unrolled stack): XLA otherwise fuses
the transposes into the elementwise ops before them, and a transposing loop fusion runs several
times slower than the same loop plus a separate transpose. Elsewhere fp32 keeps plain einsums.
On a CPU without bf16 matrix hardware (AVX2 or AVX-512 without BF16: XLA:CPU's bf16 dot runs at
~0.6x its fp32 dot there) the bf16 dots are done as fp32 dots of the bf16-rounded operands, when the
cached probe below says that is faster: the same products and fp32 sums, so the same numbers up to
summation order, while activations, residuals and the cotangents stay bf16. The probe also gives
`llmx.flops` the CPU's bf16 peak for MFU.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmx import mesh as mesh_lib
from llmx import quantization, weight_grad
from llmx.native import best_seconds, cpu_identity

log = logging.getLogger(__name__)


def _canonical_einsum(spec_a: str, spec_b: str, spec_out: str, a, b):
    """einsum(a, b) in fp32 with a transposed to (batch, free, contracted) and b to (batch, contracted, free)."""
    batch = [c for c in spec_out if c in spec_a and c in spec_b]
    contracted = [c for c in spec_a if c in spec_b and c not in spec_out]
    new_a = "".join(batch + [c for c in spec_a if c not in spec_b] + contracted)
    new_b = "".join(batch + contracted + [c for c in spec_b if c not in spec_a])
    a = jnp.transpose(a, [spec_a.index(c) for c in new_a])
    b = jnp.transpose(b, [spec_b.index(c) for c in new_b])
    return jnp.einsum(f"{new_a},{new_b}->{spec_out}", a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _compute_dtype_einsum(spec: str, dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _compute_dtype_fwd(spec, dtype, a, b):
    return _compute_dtype_einsum(spec, dtype, a, b), (a, b)


def _specs(spec: str) -> tuple[str, str, str]:
    """'ab,bc->ac' -> ('ab', 'bc', 'ac')."""
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    return spec_a, spec_b, out


def _compute_dtype_bwd(spec, dtype, residuals, g):
    a, b = residuals
    spec_a, spec_b, out = _specs(spec)
    g = g.astype(dtype)  # the cotangent in the compute dtype: bf16 x bf16 -> fp32 backward dots
    grad_a = _canonical_einsum(out, spec_b, spec_a, g, b.astype(dtype))
    if weight_grad.takes(spec, dtype, b.shape):  # one CPU device: the kernel, no transposed copy of a
        grad_b = weight_grad.weight_grad(spec, a.astype(dtype), g, b.shape)
    else:
        grad_b = _canonical_einsum(spec_a, out, spec_b, a.astype(dtype), g)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_compute_dtype_einsum.defvjp(_compute_dtype_fwd, _compute_dtype_bwd)


def _rounded_fp32(x, dtype):
    return x.astype(dtype).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _upcast_einsum(spec: str, dtype, a, b):
    return jnp.einsum(spec, _rounded_fp32(a, dtype), _rounded_fp32(b, dtype))


def _upcast_fwd(spec, dtype, a, b):
    return _upcast_einsum(spec, dtype, a, b), (a, b)  # residuals in their own (bf16) dtypes


def _upcast_bwd(spec, dtype, residuals, g):
    a, b = residuals
    spec_a, spec_b, out = _specs(spec)
    g = _rounded_fp32(g, dtype)  # the cotangent rounded as the native path rounds it
    grad_a = jnp.einsum(f"{out},{spec_b}->{spec_a}", g, _rounded_fp32(b, dtype))
    grad_b = jnp.einsum(f"{spec_a},{out}->{spec_b}", _rounded_fp32(a, dtype), g)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_upcast_einsum.defvjp(_upcast_fwd, _upcast_bwd)


def upcast_bf16_dots_here() -> bool:
    """Whether the bf16 dots being traced run on a CPU where fp32 dots of upcast operands are faster
    (the platform of the mesh being traced for, so an AOT compile for a TPU or GPU keeps bf16 dots)."""
    return mesh_lib.traced_platform() == "cpu" and cpu_bf16_dots_upcast()


# Names of every einsum's output, for the activation-checkpointing policies (llmx.models.layers.REMAT_POLICIES):
# jax's own dots_saveable policies look for dot_general primitives, which the custom VJPs above hide.
DOT = "llmx_dot"  # a dot with batch dimensions (attention's scores and values)
PROJECTION = "llmx_projection"  # a dot without (the weight projections)


def _has_batch_dims(spec: str) -> bool:
    spec_a, spec_b, out = _specs(spec)
    return any(c in spec_b and c in out for c in spec_a)


def _float_einsum(spec: str, x, w):
    """x (compute dtype) times w cast to x's dtype, fp32 accumulation (the paths in the module docstring)."""
    if x.dtype == jnp.float32:
        if mesh_lib.traced_platform() == "cpu":
            return _compute_dtype_einsum(spec, jnp.float32, x, w)  # the laid-out backward (module docstring)
        return jnp.einsum(spec, x, w.astype(jnp.float32), preferred_element_type=jnp.float32)
    if x.dtype == jnp.bfloat16 and upcast_bf16_dots_here():
        return _upcast_einsum(spec, x.dtype, x, w)
    return _compute_dtype_einsum(spec, x.dtype, x, w)


def einsum(spec: str, x, w):
    """x (compute dtype) times w (cast to x's dtype, e.g. an fp32 master weight) -> fp32. Every index
    of w must be in x or the output; the weight gradient comes back in w's dtype. The output is named
    DOT or PROJECTION for the activation-checkpointing policies.

    Quantization (llmx.quantization) happens here and only here: a stored int8/int4/fp8 weight (a
    QArray, from `llmx.quantize`) is read as such, and under `model.quantization` the projections
    (einsums without batch dimensions: attention's activation x activation dots stay in the compute
    dtype) are fake-quantised for quantization-aware training."""
    if isinstance(w, quantization.QArray):
        out = quantization.stored_einsum(spec, x, w, _float_einsum)
    elif (qat := quantization.QAT_EINSUMS[quantization.current_mode()]) is not None and not _has_batch_dims(spec):
        out = qat(spec, x, w, _float_einsum)
    else:
        out = _float_einsum(spec, x, w)
    return checkpoint_name(out, DOT if _has_batch_dims(spec) else PROJECTION)


# ---------------------------------------------------------------- the CPU probe


def _cache_file() -> Path:
    return Path(os.environ.get("LLMX_CACHE_DIR", Path.home() / ".cache" / "llmx")) / "cpu_peak.json"


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
        "native": flops / best_seconds(native, a, a, repeats=repeats),
        "upcast": flops / best_seconds(upcast, a, a, repeats=repeats),
    }
    result["flops"] = max(result["native"], result["upcast"])
    return result


# (cache file, CPU key) -> probe: every bf16 einsum asks while it is traced, so the file is read once.
_PROBES: dict[tuple[str, str], dict] = {}


def cpu_matmul_probe() -> dict:
    """The probe above, run once per CPU and cached (`LLMX_CACHE_DIR`); {'native', 'upcast', 'flops'}."""
    key = f"{cpu_identity()}|{os.cpu_count()}|{jax.__version__}"
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
