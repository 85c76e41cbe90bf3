"""The optimizer: an optax chain built from `OptimConfig`.

clip_by_global_norm -> adamw | sgd (momentum, Nesterov) with decoupled weight decay (Loshchilov &
Hutter 2019) masked off norm scales and biases, driven by one of the schedules below.
"""

from __future__ import annotations

import jax
import optax

from llmx.config import OptimConfig

# Parameter names that are norm scales or biases: no weight decay on them unless configured.
_NO_DECAY_NAMES = ("scale", "bias")


def _warmup(cfg: OptimConfig) -> optax.Schedule:
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)


def _after_warmup(decay: optax.Schedule, cfg: OptimConfig) -> optax.Schedule:
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([_warmup(cfg), decay], [cfg.warmup_steps])


def _decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(1, cfg.decay_steps or total_steps - cfg.warmup_steps)


SCHEDULES = {
    "constant": lambda cfg, total: _after_warmup(optax.constant_schedule(cfg.lr), cfg),
    "linear": lambda cfg, total: _after_warmup(
        optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, _decay_steps(cfg, total)), cfg
    ),
    "cosine": lambda cfg, total: _after_warmup(
        optax.cosine_decay_schedule(cfg.lr, _decay_steps(cfg, total), alpha=cfg.min_lr_ratio), cfg
    ),
    "step": lambda cfg, total: _after_warmup(
        optax.exponential_decay(cfg.lr, cfg.step_every, cfg.step_gamma, staircase=True), cfg
    ),
    # Smith's 1cycle: warmup_steps (or 30 %) rising, then cosine annealing; ends at lr/1e4.
    "one_cycle": lambda cfg, total: optax.cosine_onecycle_schedule(
        transition_steps=max(1, total),
        peak_value=cfg.lr,
        pct_start=(cfg.warmup_steps / total) if cfg.warmup_steps and total else 0.3,
    ),
}


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    return SCHEDULES[cfg.schedule](cfg, total_steps)


def decay_mask(params, *, decay_norms_and_biases: bool = False):
    """True for the leaves that get weight decay: all but norm scales and biases (unless configured)."""

    def decays(path, _):
        # The parameter's own name is the last dict key (nnx.State paths end in a Variable's `.value`).
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return decay_norms_and_biases or name not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        lr,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda p: decay_mask(p, decay_norms_and_biases=cfg.decay_norms_and_biases),
    )


def _sgd(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    decay = optax.masked(
        optax.add_decayed_weights(cfg.weight_decay),
        lambda p: decay_mask(p, decay_norms_and_biases=cfg.decay_norms_and_biases),
    )
    return optax.chain(decay, optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}


def build(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (the schedule is also logged as `lr`)."""
    lr = schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(OPTIMIZERS[cfg.name](cfg, lr))
    return optax.chain(*parts), lr
