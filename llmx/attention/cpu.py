"""`model.attention=cpu`: the flash-attention kernel of `flash_cpu.cc` (XLA FFI), for XLA:CPU.

The C++ source ships with the package and is compiled on first use for this CPU (`llmx.native`). Without a compiler `available()` is
False with the reason in `unavailable_reason()`: `model.attention=auto` then keeps the XLA einsums,
and an explicit `model.attention=cpu` is a one-line error.

The kernel takes q (B, T, H, Dh), k, v (B, T, K, Dh) in f32 or bf16 and segment ids (B, T), and
computes causal document-masked attention in 64 x 64 tiles with fp32 statistics (FlashAttention-2,
forward and recomputing backward); see the comment at the top of `flash_cpu.cc` for why it exists.
It runs unpartitioned, so it is used on one-device CPU meshes only (`llmx.attention.resolve`).

Two builds (`VARIANTS`): "native" multiplies bf16 inputs with AVX512-BF16 dot instructions where the
CPU has them, "wide" widens them to fp32 FMAs (f32 inputs take FMAs in both). `model.attention=auto`
takes the kernel on a one-device CPU mesh when `faster_than_xla` says so: a probe, run once per CPU,
kernel source and dtype and cached next to the library, that times forward plus backward of the bench
model's attention shape by each build and by the XLA einsums (the matmul probe's pattern, llmx.matmul);
the fastest build runs (`best_variant`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmx import native
from llmx.matmul import DOT

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("flash_cpu.cc")
WHAT = "CPU flash-attention kernel"
FORWARD, BACKWARD = "llmx_flash_cpu_forward", "llmx_flash_cpu_backward"
DTYPES = (jnp.float32, jnp.bfloat16)


def _cache_dir() -> Path:
    return native.cache_dir("flash_cpu")


_compiler = native.compiler
_intact = native.intact


@functools.cache  # asked for by every attention layer while a model is traced
def _key(*extra: str) -> str:
    return native.key(SOURCE, *extra)


# Builds of flash_cpu.cc: "native" multiplies bf16 inputs with AVX512-BF16 dot instructions where the
# CPU has them (elsewhere it is the same as "wide"); "wide" widens bf16 to fp32 and uses FMAs.
VARIANTS = {"native": [], "wide": ["-DLLMX_FLASH_NO_BF16_DOTS"]}


def _targets(variant: str) -> tuple[str, str]:
    return f"{FORWARD}_{variant}", f"{BACKWARD}_{variant}"


def _library_path(compiler: str, variant: str = "native") -> Path:
    return _cache_dir() / f"libllmx_flash_cpu-{variant}-{_key(compiler, *VARIANTS[variant])}.so"


def _build(compiler: str, target: Path, flags: list[str] = ()) -> None:
    native.build(compiler, SOURCE, target, flags, what=WHAT)


# variant -> whether its build multiplies bf16 with bf16 dot instructions, once loaded.
_BF16_DOTS: dict[str, bool] = {}


@functools.cache
def _load(variant: str = "native") -> tuple[bool, str]:
    """Build (once per CPU, source and variant) and register the FFI handlers; (ok, reason if not)."""
    compiler = _compiler()
    if compiler is None:
        return False, "no C++ compiler found (set CXX or install g++)"
    path = _library_path(compiler, variant)
    try:
        library = native.load(compiler, SOURCE, path, VARIANTS[variant], what=WHAT)
        forward, backward = _targets(variant)
        jax.ffi.register_ffi_target(forward, jax.ffi.pycapsule(library.LlmxFlashForward), platform="cpu")
        jax.ffi.register_ffi_target(backward, jax.ffi.pycapsule(library.LlmxFlashBackward), platform="cpu")
        _BF16_DOTS[variant] = bool(library.LlmxFlashBf16Dots())
    except (OSError, RuntimeError) as e:
        return False, f"building the CPU flash-attention kernel failed: {e}"
    return True, ""


def available() -> bool:
    """Whether the kernel is built and registered on this host (building it on the first call)."""
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]


@functools.cache
def _note_unavailable() -> None:
    """Once per process, why `auto` runs attention as XLA einsums on this CPU (a failed build is a
    warning: a compiler was there)."""
    reason = unavailable_reason()
    level = logging.WARNING if reason.startswith("building") else logging.INFO
    log.log(level, "CPU flash-attention kernel unavailable: %s; attention runs as XLA einsums", reason)


def bf16_dots() -> bool:
    """Whether this CPU's build multiplies bf16 inputs with bf16 dot instructions (AVX512-BF16)."""
    return available() and _BF16_DOTS["native"]


def takes(dtype) -> bool:
    """Whether the kernel computes in `dtype` (f32 or bf16)."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in DTYPES]


def supports(q_shape, dtype) -> bool:
    """Whether `flash_cpu_attention` handles q of this shape and dtype: `takes` it, head_dim a multiple of 16."""
    return takes(dtype) and q_shape[-1] % 16 == 0


@functools.cache
def variant_attention(variant: str):
    """Causal document-masked attention of q (B, T, H, Dh) over k, v (B, T, K, Dh) -> (B, T, H, Dh) by
    the `variant` build of the kernel, with its backward kernel as the VJP."""
    forward, backward = _targets(variant)

    def forward_call(q, k, v, segment_ids):
        ok, reason = _load(variant)
        if not ok:
            raise RuntimeError(reason)
        B, T, H, _ = q.shape
        out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
        return jax.ffi.ffi_call(forward, out)(q, k, v, segment_ids.astype(jnp.int32))

    @jax.custom_vjp
    def attention(q, k, v, segment_ids):
        return forward_call(q, k, v, segment_ids)[0]

    def fwd(q, k, v, segment_ids):
        out, lse = forward_call(q, k, v, segment_ids)
        # Named like attention's einsums in xla: model.remat=dots_saveable keeps them, the policies that
        # save only projections recompute the forward kernel in the backward pass.
        out, lse = checkpoint_name(out, DOT), checkpoint_name(lse, DOT)
        return out, (q, k, v, segment_ids, out, lse)

    def bwd(residuals, g):
        q, k, v, segment_ids, out, lse = residuals
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        dq, dk, dv = jax.ffi.ffi_call(backward, shapes)(q, k, v, segment_ids.astype(jnp.int32), out, lse,
                                                        g.astype(q.dtype))
        return dq, dk, dv, None

    attention.defvjp(fwd, bwd)
    return attention


def flash_cpu_attention(q, k, v, segment_ids):
    """Causal document-masked attention of q (B, T, H, Dh) over k, v (B, T, K, Dh) -> (B, T, H, Dh), by
    the build the probe chose for this CPU and dtype (`best_variant`)."""
    return variant_attention(best_variant(q.dtype))(q, k, v, segment_ids)


# ---------------------------------------------------------------- the probe behind model.attention=auto

PROBE_SHAPE = (4, 256, 4, 4, 64)  # B, T, H, K, Dh: the bench model's attention (configs/bench_cpu.yaml), half its batch
_PROBES: dict[str, dict] = {}


def measure(dtype, *, shape=PROBE_SHAPE, repeats: int = 5) -> dict:
    """Best seconds of one jitted forward + backward of causal attention of `shape` on the host CPU, by
    each build of the kernel that differs here ('native', and 'wide' for bf16 on a CPU with bf16 dot
    instructions) and by the XLA einsums ('xla')."""
    from llmx.attention.xla import xla_attention

    B, T, H, K, Dh = shape
    device = jax.devices("cpu")[0]
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.device_put(jax.random.normal(keys[0], (B, T, H, Dh), dtype), device)
    k, v = (jax.device_put(jax.random.normal(kk, (B, T, K, Dh), dtype), device) for kk in keys[1:3])
    g = jax.device_put(jax.random.normal(keys[3], (B, T, H, Dh), dtype), device)
    segment_ids = jax.device_put(jnp.ones((B, T), jnp.int32), device)
    candidates = {"native": variant_attention("native"), "xla": xla_attention}
    if jnp.dtype(dtype) == jnp.bfloat16 and bf16_dots():
        candidates["wide"] = variant_attention("wide")
    result = {}
    for name, fn in candidates.items():
        step = jax.jit(lambda q, k, v, g, fn=fn: jax.vjp(lambda *a: fn(*a, segment_ids), q, k, v)[1](g))
        result[name] = native.best_seconds(step, q, k, v, g, repeats=repeats)
    return result


def probe(dtype) -> dict:
    """`measure(dtype)`, run once per CPU, kernel source and dtype, cached in the library's directory."""
    name = jnp.dtype(dtype).name
    return native.cached_probe(_cache_dir() / "probe.json", f"{_key()}|{name}", {"native", "xla"},
                               lambda: measure(dtype), _PROBES,
                               what=f"CPU attention ({name}, {'x'.join(map(str, PROBE_SHAPE))}, forward+backward)")


def best_variant(dtype) -> str:
    """The build of the kernel the probe timed fastest for `dtype` on this CPU."""
    times = probe(dtype)
    return min((v for v in VARIANTS if v in times), key=times.__getitem__)


def faster_than_xla(dtype) -> bool:
    """Whether `model.attention=auto` should take this kernel for `dtype` on this CPU: it builds, takes
    the dtype, and the cached probe timed its best build faster than the XLA einsums."""
    if not takes(dtype):
        return False
    if not available():
        _note_unavailable()
        return False
    times = probe(dtype)
    return times[best_variant(dtype)] < times["xla"]
