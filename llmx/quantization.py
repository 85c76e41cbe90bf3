"""Quantized matmuls: weights stored as int8 / int4 / fp8 with scales (post-training, `llmx.quantize`), and
quantization-aware training's fake-quantised projections (`model.quantization`). `llmx.matmul.einsum`,
the one matmul entry point, calls in here, so every projection of every layer is covered, under any
sharding (the ops below are plain jnp on whole logical arrays; the partitioner splits them like the
matmul they feed).

The arrays are Google's qwix `QArray`s (values, scales) made and read by its core ops
(`qwix.quantize`, `qwix.dequantize`, `qwix.einsum`; integers on a symmetric grid, see `quantize`).
qwix's model-level entry (`qwix.quantize_model`, which intercepts a module's matmuls and swaps parameters) is not used: it asserts on llmx's stacked
`(layers, ...)` parameters and on weight x weight einsums (DESIGN §7), and its training op
(`dot_general_qt`) is private to `qwix._src`. The few functions it would have given are below.

Scales. A stored weight has one scale per output channel: every axis its matmul does not contract
(the stacked `layers` axis included, so each layer has its own) gets a scale per index; the contracted
axes share one (`group` > 0 splits the last contracted axis into groups of that many weights, each
with its own scale: int4's usual g32/g128). A weight that reads the residual stream contracts `embed`;
one that writes it (its last logical axis is `embed`) contracts every other axis; the embedding table
is read by rows, so its scale is per `vocab` row (and, tied, that is the output projection's channel).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from llmx.errors import ConfigError

QArray = qwix.QArray

# model.weight_format -> the stored type of matmul weights (`float`: the parameters as trained).
WEIGHT_TYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
# Axes a stacked weight carries besides its matrix: never contracted, always one scale per index.
STACKED_AXES = ("layers", "expert")
# Integer grids are used symmetrically, [-127, 127] and [-7, 7], as in AQT/MaxText. qwix's absmax maps
# the largest magnitude to 127.5 (7.5), exactly a rounding tie, which two compilations of the same
# division (one device vs. a sharded mesh) can round apart, so QAT gradients would differ between meshes.
_INT_MAX = {jnp.dtype(jnp.int8): 127, jnp.dtype(jnp.int4): 7}


def quantize(x: jax.Array, qtype, *, channelwise_axes=(), tiled_axes=None) -> QArray:
    """qwix.quantize with absmax calibration, integer types on their symmetric grid (above)."""
    int_max = _INT_MAX.get(jnp.dtype(qtype))
    method = f"absmax,{(int_max + 0.5) / int_max!r}" if int_max else "absmax"
    return qwix.quantize(x, qtype, channelwise_axes=channelwise_axes, tiled_axes=tiled_axes,
                         calibration_method=method)


# ---------------------------------------------------------------- stored (post-training) weights


def is_matmul_weight(logical_axes) -> bool:
    """A weight some matmul (or the embedding lookup) reads: two or more axes besides the stacked ones;
    norm scales and biases stay in their float dtype."""
    return sum(a not in STACKED_AXES for a in logical_axes) >= 2


def contracted_axes(logical_axes) -> tuple[int, ...]:
    """The axes of a weight its matmul contracts (the module docstring gives the rule)."""
    axes = tuple(logical_axes)
    matrix = [i for i, a in enumerate(axes) if a not in STACKED_AXES]
    if axes[-1] == "embed" and "vocab" not in axes:
        return tuple(i for i in matrix if axes[i] != "embed")
    return tuple(i for i in matrix if axes[i] == "embed")


def check_group(logical_axes, shape, group: int, *, name: str) -> None:
    """A ConfigError when `group` does not divide the last contracted axis of this weight."""
    if group:
        axis = contracted_axes(logical_axes)[-1]
        width = shape[axis]
        if width % group:
            divisors = [d for d in (256, 128, 64, 32, 16, 8, 4, 2) if width % d == 0 and d < group][:2]
            hint = f"use a divisor of {width} such as {' or '.join(map(str, divisors))}" if divisors else "use 0 (per channel)"
            raise ConfigError(
                f"--group {group} does not divide the {logical_axes[axis]} width {width} of {name}; {hint}"
            )


def quantize_weight(value: jax.Array, logical_axes, *, weight_format: str, group: int = 0) -> QArray:
    """`value` as a QArray of `weight_format` with a scale per output channel (and per group of `group`
    weights along the last contracted axis), scales in the weight's dtype."""
    contracted = contracted_axes(logical_axes)
    channels = tuple(i for i in range(value.ndim) if i not in contracted)
    tiles = {contracted[-1]: group} if group else None
    return quantize(value, WEIGHT_TYPES[weight_format], channelwise_axes=channels, tiled_axes=tiles)


def _matmul_params(model: nnx.Module):
    """(path name, Param) of every matmul weight of `model`."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and is_matmul_weight(node.get_metadata().get("out_sharding") or ()):
            yield "/".join(str(p) for p in path), node


def check_weights(model: nnx.Module, *, group: int) -> None:
    """Every matmul weight of `model` can be quantized with `group` (ConfigError naming the first that cannot)."""
    for name, param in _matmul_params(model):
        check_group(param.get_metadata()["out_sharding"], param.shape, group, name=name)


def quantize_model(model: nnx.Module, *, weight_format: str, group: int = 0) -> nnx.Module:
    """Replaces, in place, the value of every matmul weight of `model` by its QArray; returns `model`.
    The Params keep their logical axes, so the values and the scales are sharded like the weight
    (`llmx.mesh.weight_shardings` splits each array of a Param by the Param's axes)."""
    for name, param in _matmul_params(model):
        axes = param.get_metadata()["out_sharding"]
        check_group(axes, param.shape, group, name=name)
        param.set_value(quantize_weight(param.get_value(), axes, weight_format=weight_format, group=group))
    return model


def stored_builder(build: Callable, weight_format: str, group: int) -> Callable:
    """The family's model builder, with matmul weights stored as `weight_format` unless it is `float`."""
    if weight_format == "float":
        return build

    @functools.wraps(build)
    def build_stored(cfg, *, rngs):
        return quantize_model(build(cfg, rngs=rngs), weight_format=weight_format, group=group)

    return build_stored


def take_rows(table, ids):
    """Rows `ids` of an embedding table (V, D), a plain array or a QArray (dequantised rows, scale per row)."""
    if isinstance(table, QArray):
        return qwix.dequantize(dataclasses.replace(
            table, qvalue=jnp.take(table.qvalue, ids, axis=0), scale=jnp.take(table.scale, ids, axis=0)))
    return jnp.take(table, ids, axis=0)


def stored_bytes(tree, *, per_device: bool = False) -> int:
    """Bytes of a tree of arrays (or ShapeDtypeStructs) as stored, int4 counting half a byte per value;
    with `per_device`, one device's share (each leaf's shard shape under its sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if per_device else leaf.shape
        bits = 4 if leaf.dtype == jnp.int4 else jnp.dtype(leaf.dtype).itemsize * 8
        total += math.prod(shape) * bits // 8
    return total


# ---------------------------------------------------------------- quantization-aware training

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("llmx_quantization", default="none")


@contextlib.contextmanager
def mode(name: str):
    """While a model is traced in here, its projections run `model.quantization=name` (the model's
    entry points set it from their config, inside the traced function, so jit caches stay correct)."""
    token = _MODE.set(name)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    return _MODE.get()


def _specs(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return a, b, out


def _channel_axes(operand: str, other: str, out: str) -> tuple[int, ...]:
    """The axes of `operand` the einsum does not contract: each index gets its own scale (per token for
    activations, per output channel for weights)."""
    return tuple(i for i, c in enumerate(operand) if not (c in other and c not in out))


def fake_quant(x, qtype, channel_axes=()):
    """x rounded to `qtype`'s grid (absmax scale per `channel_axes` index, one per tensor if empty) in
    the forward pass, the identity in the backward pass: the straight-through estimator (Bengio et al.
    2013), as in AQT / qwix QAT."""
    rounded = qwix.dequantize(quantize(x, qtype, channelwise_axes=channel_axes))
    return x + jax.lax.stop_gradient(rounded.astype(x.dtype) - x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_cotangent(y, qtype):
    """The identity in the forward pass; the backward pass rounds the incoming gradient to `qtype`
    with a per-tensor scale (fp8 training's e5m2 gradients)."""
    return y


def _quantize_cotangent_fwd(y, qtype):
    return y, None


def _quantize_cotangent_bwd(qtype, _, g):
    return (qwix.dequantize(quantize(g, qtype)).astype(g.dtype),)


quantize_cotangent.defvjp(_quantize_cotangent_fwd, _quantize_cotangent_bwd)


def int8_einsum(spec: str, x, w, inner: Callable):
    """int8 QAT: activations per token and weights per output channel fake-quantised to int8, the
    products by `inner` (the compute-dtype einsum) with straight-through gradients to the fp32 master
    weights."""
    a, b, out = _specs(spec)
    xq = fake_quant(x, jnp.int8, _channel_axes(a, b, out))
    wq = fake_quant(w, jnp.int8, _channel_axes(b, a, out))
    return inner(spec, xq, wq)


def fp8_einsum(spec: str, x, w, inner: Callable):
    """fp8 training as Transformer Engine / MaxText do it (Micikevicius et al. 2022): activations and
    weights in e4m3 (more mantissa) forward, the output gradient in e5m2 (more range) backward, each
    scaled per tensor by its current absmax ("current scaling"); the backward matmuls use the e4m3
    operands saved from the forward."""
    xq = fake_quant(x, jnp.float8_e4m3fn)
    wq = fake_quant(w, jnp.float8_e4m3fn)
    return quantize_cotangent(inner(spec, xq, wq), jnp.float8_e5m2)


# model.quantization -> the projection einsum (None: the plain compute-dtype einsum).
QAT_EINSUMS: dict[str, Callable | None] = {"none": None, "int8": int8_einsum, "fp8": fp8_einsum}
# model.quantization -> how activations meet a stored weight of the same format.
ACTIVATION_TYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def stored_einsum(spec: str, x, w: QArray, inner: Callable):
    """x times a stored (post-training quantized) weight. Weight-only (model.quantization=none, or a
    format other than the activations'): the weight dequantised in the compute dtype, then `inner`.
    Activations quantized too (a QAT run quantized to its own format): int8 x int8 -> int32 (or fp8 x
    fp8 -> fp32) products by qwix, scales applied to the output."""
    act_type = ACTIVATION_TYPES.get(current_mode())
    if act_type is None or jnp.dtype(act_type) != jnp.dtype(w.qtype):
        return inner(spec, x, qwix.dequantize(w.astype(x.dtype)))
    a, b, out = _specs(spec)
    channels = _channel_axes(a, b, out) if act_type == jnp.int8 else ()
    xq = quantize(x, act_type, channelwise_axes=channels)
    return qwix.einsum(spec, xq, w, preferred_element_type=jnp.float32)
