"""DeepSpeed's learning-rate schedules as optax schedules, formula for formula.

WarmupLR, WarmupDecayLR, WarmupCosineLR and OneCycle of `deepspeed/runtime/lr_schedules.py`
(DeepSpeed edaa722), registered in `llmx.optim.SCHEDULES` as `warmup_lr`, `warmup_decay_lr`,
`warmup_cosine_lr` and `one_cycle_linear`.

Indexing: optax calls a schedule with the number of updates already applied (0 for the first).
DeepSpeed's engine steps its scheduler after each optimizer step (engine.py `_take_model_step`), so
update c runs at the lr of `last_batch_iteration = c - 1`, and the first update at the value the
scheduler set when it was built (`last_batch_iteration = -1`): warmup_min_lr for WarmupLR and
WarmupDecayLR, 0 for WarmupCosineLR, cycle_min_lr for OneCycle.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from llmx.config import OptimConfig
from llmx.errors import ConfigError


def _last_batch_iteration(count) -> jnp.ndarray:
    return jnp.asarray(count, jnp.float32) - 1.0


def _warmup_fraction(cfg: OptimConfig, t, warmup: int):
    """WarmupLR._get_gamma's warmup branch (lr_schedules.py L758-762): log or linear in t."""
    t = jnp.maximum(t, 0.0)  # t = -1 is handled by the callers; keeps log() finite
    if cfg.warmup_type == "log":
        return jnp.log(t + 1.0) * (1.0 / math.log(warmup))  # inverse_log_warm_up = 1 / log(W)
    return t / warmup


def _warmup_steps(cfg: OptimConfig) -> int:
    return max(2, cfg.warmup_steps)  # DeepSpeed: self.warmup_num_steps = max(2, warmup_num_steps)


def _total(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.schedule_steps or total_steps


def warmup_lr(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """WarmupLR: warmup_min_lr -> lr over warmup_steps (log or linear), then lr."""
    warmup, low, delta = _warmup_steps(cfg), cfg.warmup_min_lr, cfg.lr - cfg.warmup_min_lr

    def schedule(count):
        t = _last_batch_iteration(count)
        gamma = jnp.where(t < warmup, _warmup_fraction(cfg, t, warmup), 1.0)
        return jnp.where(t < 0, low, low + delta * gamma)

    return schedule


def warmup_decay_lr(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """WarmupDecayLR: WarmupLR's warmup, then linear decay to 0 at schedule_steps (L805-814)."""
    warmup, low, delta = _warmup_steps(cfg), cfg.warmup_min_lr, cfg.lr - cfg.warmup_min_lr
    total = _total(cfg, total_steps)

    def schedule(count):
        t = _last_batch_iteration(count)
        decay = jnp.maximum(0.0, (total - t) / max(1.0, total - warmup))
        gamma = jnp.where(t < warmup, _warmup_fraction(cfg, t, warmup), decay)
        return jnp.where(t < 0, low, low + delta * gamma)

    return schedule


def warmup_cosine_lr(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """WarmupCosineLR: lr x ratio; the ratio warms up from warmup_min_lr / lr to 1, then follows a
    half cosine down to min_lr_ratio at schedule_steps and stays there (L879-903). 0 before the
    first step (get_lr at last_batch_iteration -1, L912-914)."""
    warmup, total = _warmup_steps(cfg), _total(cfg, total_steps)
    floor = cfg.min_lr_ratio  # cos_min_ratio
    decay_steps = max(1, total - warmup)

    def schedule(count):
        t = _last_batch_iteration(count)
        warm = cfg.warmup_min_lr + _warmup_fraction(cfg, t, warmup) * (cfg.lr - cfg.warmup_min_lr)
        progress = jnp.minimum(1.0, (t - warmup + 1.0) / decay_steps)
        # (1 + cos(pi p)) / 2 written as cos(pi p / 2)^2: the same number without float32 cancellation near p = 1
        ratio = jnp.maximum(0.0, floor + (1.0 - floor) * jnp.cos(jnp.pi * progress / 2.0) ** 2)
        return jnp.where(t < 0, 0.0, jnp.where(t < warmup, warm, cfg.lr * ratio))

    return schedule


def one_cycle_linear(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """OneCycle: a triangle warmup_min_lr -> lr over warmup_steps and back over cycle_down_steps
    (optionally in stairs), then warmup_min_lr / (1 + cycle_decay_rate x t / cycle_decay_every)
    (OneCycle._get_scale_factor, _get_cycle_lr, _get_decay_lr: L557-627).

    The cycle position is computed in integers: DeepSpeed's float64 `1 + i / size - cycle` can land
    on either side of the peak at exactly the peak step, which only matters for unequal stair counts."""
    up = cfg.warmup_steps
    if up < 1:
        raise ConfigError("optim.schedule=one_cycle_linear needs optim.warmup_steps >= 1 (the rising half of the cycle)")
    down = up if cfg.cycle_down_steps < 0 else cfg.cycle_down_steps
    up_stairs = cfg.cycle_up_stairs
    down_stairs = up_stairs if cfg.cycle_down_stairs < 0 else cfg.cycle_down_stairs
    size = up + down
    low, high = cfg.warmup_min_lr, cfg.lr
    decays = cfg.cycle_decay_every > 0 and cfg.cycle_decay_rate > 0  # DeepSpeed's skip_lr_decay otherwise

    def schedule(count):
        i = jnp.asarray(count, jnp.int32)  # batch_iteration = last_batch_iteration + 1
        in_cycle = jnp.mod(i, size)  # cycle_iteration
        rising = in_cycle <= up
        x = in_cycle.astype(jnp.float32)
        scale = jnp.where(rising, x / up, (size - x) / max(down, 1))
        if up_stairs or down_stairs:
            stairs = jnp.where(rising, up_stairs, down_stairs)
            position = jnp.where(rising, x * up_stairs / up, (size - x) * down_stairs / max(down, 1))
            scale = jnp.where(stairs > 0, jnp.floor(position) / jnp.maximum(stairs, 1), scale)
        cycle_lr = low + (high - low) * scale
        if decays:
            after = (i - size).astype(jnp.float32)  # decay_batch_iteration = last_batch_iteration - size + 1
            decay_lr = low / (1.0 + cfg.cycle_decay_rate * after / cfg.cycle_decay_every)
        else:
            decay_lr = low
        return jnp.where(i - 1 < size, cycle_lr, decay_lr)

    return schedule


SCHEDULES = {
    "warmup_lr": warmup_lr,
    "warmup_decay_lr": warmup_decay_lr,
    "warmup_cosine_lr": warmup_cosine_lr,
    "one_cycle_linear": one_cycle_linear,
}
