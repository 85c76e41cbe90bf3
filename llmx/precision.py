"""Mixed precision: matmuls in the compute dtype with fp32 accumulation, and loss scaling for fp16.

Matmuls (`einsum`): operands in the compute dtype, products accumulated in fp32
(`preferred_element_type`). In bf16/fp16 the backward dots get a custom VJP: the fp32 cotangent is
cast to the compute dtype first (otherwise XLA upcasts every backward dot to fp32 and bf16 trains
at fp32 speed), and the operands are laid out (batch, free, contracted) x (batch, contracted, free),
the layouts XLA:CPU sends to its AMX bf16 path (DESIGN §6). fp32 keeps plain einsums.
On a CPU without bf16 matrix hardware (AVX2 or AVX-512 without BF16: XLA:CPU's bf16 dot runs at
~0.6x its fp32 dot there) the bf16 dots are done as fp32 dots of the bf16-rounded operands, when the
cached probe in llmx.flops says that is faster: the same products and fp32 sums, so the same numbers
up to summation order, while activations, residuals and the cotangents stay bf16.

Loss scaling for fp16, with DeepSpeed's knobs and meaning (Micikevicius et al. 2018, §3.2).

fp16 has 5 exponent bits: small gradients underflow to zero. The loss is multiplied by a scale S
before the backward pass and the gradients divided by S after it. Dynamic scaling (DeepSpeed's
`DynamicLossScaler`) starts at S = 2**initial_scale_power; a step whose gradients overflow is
skipped (the caller keeps the old parameters and optimizer state) and, once `hysteresis` overflows
have been tolerated, S is halved (never below `min_loss_scale`); after `loss_scale_window` steps in a
row without overflow S doubles and the hysteresis budget is refilled. `loss_scale > 0` fixes S.
fp32 and bf16 need no scaling (bf16 has fp32's exponent range).

optax-style: a state NamedTuple plus pure `init` / `factors` / `update` closures, so the state is a
pytree inside the TrainState (checkpointed with it) and every decision is a `jnp.where` in the
jitted step, with no host round trip.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmx import flops
from llmx import mesh as mesh_lib
from llmx.config import TrainConfig


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
def _low_precision_einsum(spec: str, dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _low_precision_fwd(spec, dtype, a, b):
    return _low_precision_einsum(spec, dtype, a, b), (a, b)


def _specs(spec: str) -> tuple[str, str, str]:
    """'ab,bc->ac' -> ('ab', 'bc', 'ac')."""
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    return spec_a, spec_b, out


def _low_precision_bwd(spec, dtype, residuals, g):
    a, b = residuals
    spec_a, spec_b, out = _specs(spec)
    g = g.astype(dtype)  # the cotangent in the compute dtype: bf16 x bf16 -> fp32 backward dots
    grad_a = _canonical_einsum(out, spec_b, spec_a, g, b.astype(dtype))
    grad_b = _canonical_einsum(spec_a, out, spec_b, a.astype(dtype), g)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_fwd, _low_precision_bwd)


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
    return mesh_lib.traced_platform() == "cpu" and flops.cpu_bf16_dots_upcast()


# Names of every einsum's output, for the activation-checkpointing policies (llmx.model.REMAT_POLICIES):
# jax's own dots_saveable policies look for dot_general primitives, which the custom VJPs above hide.
DOT = "llmx_dot"  # a dot with batch dimensions (attention's scores and values)
PROJECTION = "llmx_projection"  # a dot without (the weight projections)


def _has_batch_dims(spec: str) -> bool:
    spec_a, spec_b, out = _specs(spec)
    return any(c in spec_b and c in out for c in spec_a)


def einsum(spec: str, x, w):
    """x (compute dtype) times w (cast to x's dtype, e.g. an fp32 master weight) -> fp32. Every index
    of w must be in x or the output; the weight gradient comes back in w's dtype. The output is named
    DOT or PROJECTION for the activation-checkpointing policies."""
    if x.dtype == jnp.float32:
        out = jnp.einsum(spec, x, w.astype(jnp.float32), preferred_element_type=jnp.float32)
    elif x.dtype == jnp.bfloat16 and upcast_bf16_dots_here():
        out = _upcast_einsum(spec, x.dtype, x, w)
    else:
        out = _low_precision_einsum(spec, x.dtype, x, w)
    return checkpoint_name(out, DOT if _has_batch_dims(spec) else PROJECTION)


class LossScaleState(NamedTuple):
    scale: jax.Array  # () float32: the current loss scale S
    good_steps: jax.Array  # () int32: steps without overflow since the last overflow or growth
    hysteresis: jax.Array  # () int32: overflows still tolerated before S is halved


class LossScaler(NamedTuple):
    """init() -> state (None: no scaling); factors(state, inv_tokens) -> (pre, post): the step
    differentiates loss_sum * pre and multiplies the summed gradients by post; update(state, finite)
    -> state after a step whose gradients were (not) all finite; metrics(state) -> dict to log."""

    init: Callable[[], Any]
    factors: Callable[[Any, jax.Array], tuple[Any, jax.Array]]
    update: Callable[[Any, jax.Array], Any]
    metrics: Callable[[Any], dict]


def no_scaling() -> LossScaler:
    # pre = 1.0 is a Python constant XLA folds away: fp32 and bf16 steps are unchanged bit for bit.
    return LossScaler(
        init=lambda: None,
        factors=lambda state, inv_tokens: (1.0, inv_tokens),
        update=lambda state, finite: state,
        metrics=lambda state: {},
    )


def _scaled_factors(state: LossScaleState, inv_tokens):
    # Scale the mean loss, as DeepSpeed does, so S means the same here as there.
    return state.scale * inv_tokens, 1.0 / state.scale


def _metrics(state: LossScaleState) -> dict:
    return {"loss_scale": state.scale}


def _initial_state(scale: float, hysteresis: int) -> LossScaleState:
    return LossScaleState(
        scale=jnp.asarray(scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        hysteresis=jnp.asarray(hysteresis, jnp.int32),
    )


def static_scaling(scale: float) -> LossScaler:
    return LossScaler(
        init=lambda: _initial_state(scale, 1),
        factors=_scaled_factors,
        update=lambda state, finite: state,
        metrics=_metrics,
    )


def dynamic_scaling(*, initial_scale_power: int, loss_scale_window: int, hysteresis: int, min_loss_scale: float) -> LossScaler:
    def update(state: LossScaleState, finite) -> LossScaleState:
        overflow = ~finite
        lower = overflow & (state.hysteresis <= 1)
        good_steps = jnp.where(overflow, 0, state.good_steps + 1)
        grow = good_steps >= loss_scale_window
        scale = jnp.where(
            lower,
            jnp.maximum(state.scale * 0.5, min_loss_scale),
            jnp.where(grow, state.scale * 2.0, state.scale),
        )
        # An overflow spends one unit of hysteresis (the last one stays while the scale keeps
        # dropping); growth refills it (DeepSpeed without consecutive_hysteresis).
        left = jnp.where(
            overflow,
            jnp.where(lower, state.hysteresis, state.hysteresis - 1),
            jnp.where(grow, hysteresis, state.hysteresis),
        )
        return LossScaleState(scale=scale, good_steps=jnp.where(grow, 0, good_steps), hysteresis=left)

    return LossScaler(
        init=lambda: _initial_state(2.0**initial_scale_power, hysteresis),
        factors=_scaled_factors,
        update=update,
        metrics=_metrics,
    )


def _fp16(cfg: TrainConfig) -> LossScaler:
    if cfg.loss_scale > 0:
        return static_scaling(cfg.loss_scale)
    return dynamic_scaling(
        initial_scale_power=cfg.initial_scale_power,
        loss_scale_window=cfg.loss_scale_window,
        hysteresis=cfg.hysteresis,
        min_loss_scale=cfg.min_loss_scale,
    )


SCALERS: dict[str, Callable[[TrainConfig], LossScaler]] = {
    "fp32": lambda cfg: no_scaling(),
    "bf16": lambda cfg: no_scaling(),
    "fp16": _fp16,
}


def loss_scaler(cfg: TrainConfig) -> LossScaler:
    """The loss scaling `train.precision` needs."""
    return SCALERS[cfg.precision](cfg)
