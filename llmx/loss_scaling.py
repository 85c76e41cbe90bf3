"""Loss scaling for fp16, with DeepSpeed's knobs and meaning (Micikevicius et al. 2018, §3.2).

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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llmx.config import TrainConfig


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
