"""The optimizer: an optax chain built from `OptimConfig`.

clip_by_global_norm -> adamw | sgd (momentum, Nesterov) | lamb, with weight decay masked off norm
scales and biases, driven by one of the schedules below; `optim.impl` picks optax's XLA-fused
implementation or the fused optimizers of `pallas_kernels` (DeepSpeed's FusedAdam/FusedLamb). Those
run as compiled Pallas kernels where the mesh's devices are TPUs or GPUs, and as their jnp reference
(the same update, state and sharding, fused by XLA) on CPU, where Pallas only interprets.
"""

from __future__ import annotations

import functools
import logging

import jax
import optax
from jax.sharding import Mesh

import pallas_kernels

from llmx import ds_schedules, pruning
from llmx.config import OptimConfig

log = logging.getLogger(__name__)

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
    **ds_schedules.SCHEDULES,  # DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle
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


def _mask(cfg: OptimConfig):
    return lambda params: decay_mask(params, decay_norms_and_biases=cfg.decay_norms_and_biases)


def _decayed_sgd(sgd_fn):
    """SGD with L2-style weight decay added to the gradient first (torch.optim.SGD's `weight_decay`)."""

    def build(cfg: OptimConfig, lr: optax.Schedule, **kwargs) -> optax.GradientTransformation:
        decay = optax.masked(optax.add_decayed_weights(cfg.weight_decay), _mask(cfg))
        return optax.chain(decay, sgd_fn(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov, **kwargs))

    return build


def _adam_family(adam_fn):
    def build(cfg: OptimConfig, lr: optax.Schedule, **kwargs) -> optax.GradientTransformation:
        return adam_fn(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_mask(cfg), **kwargs)

    return build


# (optim.name, implementation) -> builder. optax is partitioned by XLA. The fused optimizers update each
# device's shard under shard_map, so they are given the mesh and the optimizer state's PartitionSpecs:
# "pallas" is the kernel, "reference" the same update in jnp (optim.impl=pallas picks one by platform).
OPTIMIZERS = {
    ("adamw", "optax"): _adam_family(optax.adamw),
    ("sgd", "optax"): _decayed_sgd(optax.sgd),
    ("lamb", "optax"): _adam_family(optax.lamb),
    ("adamw", "pallas"): _adam_family(pallas_kernels.adamw),
    ("sgd", "pallas"): _decayed_sgd(pallas_kernels.sgd),
    ("lamb", "pallas"): _adam_family(pallas_kernels.lamb),
    ("adamw", "reference"): _adam_family(pallas_kernels.adamw_reference),
    ("sgd", "reference"): _decayed_sgd(pallas_kernels.sgd_reference),
    ("lamb", "reference"): _adam_family(pallas_kernels.lamb_reference),
}
# optim.impl=pallas on each platform: Pallas lowers to Mosaic on TPU and Triton on GPU; on CPU it only
# interprets (milliseconds per grid step), so the XLA-fused jnp reference trains there instead.
FUSED_IMPLS = {"cpu": "reference"}  # every other platform: the compiled kernel


def fused_impl(mesh: Mesh) -> str:
    """What optim.impl=pallas runs for a step compiled for `mesh`: "pallas" (the kernel) or "reference"."""
    return FUSED_IMPLS.get(mesh.devices.flat[0].platform, "pallas")


@functools.cache
def _log_fused_impl(name: str, platform: str, impl: str) -> None:
    what = "the compiled Pallas kernel" if impl == "pallas" else "its jnp reference (Pallas only interprets here)"
    log.info("optim.impl=pallas: fused %s on %s runs %s", name, platform, what)


def build(
    cfg: OptimConfig, total_steps: int, *, mesh: Mesh | None = None, state_specs=None, param_axes=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (the schedule is also logged as `lr`).

    `mesh` (the mesh the step is compiled for) and `state_specs` (one PartitionSpec per parameter: how
    its optimizer state is split) are needed by `optim.impl=pallas`: the mesh's platform, never the
    host's default backend, decides between the kernels and their reference (`fused_impl`). optax
    ignores both. `param_axes` (the parameters' logical axes) tells `optim.prune_method` what to prune.
    """
    lr = schedule(cfg, total_steps)
    impl, kwargs = cfg.impl, {}
    if cfg.impl == "pallas":
        if mesh is None:
            raise ValueError("optim.impl=pallas needs the mesh the step is compiled for: pass mesh= and state_specs=")
        impl = fused_impl(mesh)
        _log_fused_impl(cfg.name, mesh.devices.flat[0].platform, impl)
        kwargs = {"mesh": mesh, "param_specs": state_specs} | ({"interpret": False} if impl == "pallas" else {})
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(OPTIMIZERS[cfg.name, impl](cfg, lr, **kwargs))
    if cfg.prune_method != "none":  # last: it zeroes pruned weights through their update
        if param_axes is None:
            raise ValueError("optim.prune_method needs the parameters' logical axes: pass param_axes=")
        parts.append(pruning.prune(pruning.Schedule(
            method=cfg.prune_method, sparsity=cfg.prune_sparsity, begin_step=cfg.prune_begin_step,
            end_step=cfg.prune_end_step, every=cfg.prune_every, n=cfg.prune_n, m=cfg.prune_m), param_axes))
    return optax.chain(*parts), lr
