"""Pruning as an optax `GradientTransformation` at the end of the optimizer chain (`optim.prune_*`).

- `magnitude`: gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", Eq. 1): the
  sparsity rises from 0 at `begin_step` to `prune_sparsity` at `end_step` along a cubic,
  s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3), and every `prune_every` steps (and at t1) each layer of
  each projection keeps its largest-magnitude weights, exactly round(s(t) n) of its n pruned.
- `n_m`: N:M structured sparsity (2:4 by default, what NVIDIA's sparse tensor cores run; Mishra et
  al. 2021): of every M consecutive weights along the contracted axis, the N largest stay. Masks are
  recomputed every `prune_every` steps from `begin_step` to `end_step`, then frozen.

What is pruned: the projections inside the stacked layers (every matmul weight with a `layers` axis;
the embedding, the output projection and norm scales stay dense), each layer on its own. The masks
live in the optimizer state (so they are sharded like the moments, checkpointed, restored exactly on
resume, and rolled back with a skipped step); after each update the pruned weights are exactly 0.0:
their update is -w.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmx.errors import ConfigError
from llmx.quantization import QArray, contracted_axes, is_matmul_weight


class PruneState(NamedTuple):
    count: jax.Array  # () int32: updates seen, the step being taken
    masks: Any  # bool, shaped like the parameters: True = kept


@dataclasses.dataclass(frozen=True)
class Schedule:
    method: str  # "magnitude" | "n_m"
    sparsity: float
    begin_step: int
    end_step: int
    every: int
    n: int = 2
    m: int = 4

    def validate(self) -> None:
        if self.end_step < self.begin_step:
            raise ConfigError(
                f"optim.prune_end_step={self.end_step} is before optim.prune_begin_step={self.begin_step}; "
                "pruning ramps up between them, so set end_step >= begin_step"
            )
        if self.method == "n_m" and not 0 < self.n < self.m:
            raise ConfigError(f"optim.prune_n={self.n} must be between 1 and optim.prune_m - 1 = {self.m - 1}")

    def target(self, step):
        """Zhu & Gupta's cubic sparsity at `step` (a Python or traced number)."""
        if self.method == "n_m":
            return 1.0 - self.n / self.m
        span = max(self.end_step - self.begin_step, 1)
        progress = jnp.clip((step - self.begin_step) / span, 0.0, 1.0)
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def updates_masks(self, step):
        """Whether the masks are recomputed at `step` (every `every` steps from begin to end, and at end)."""
        inside = (step >= self.begin_step) & (step <= self.end_step)
        return inside & (((step - self.begin_step) % self.every == 0) | (step == self.end_step))


def prunable(logical_axes) -> bool:
    """The projections inside the stacked layers."""
    return "layers" in tuple(logical_axes) and is_matmul_weight(logical_axes)


def _magnitude_mask(w, sparsity, layer_axis: int):
    """Per layer: exactly round(sparsity * n) of the n weights with the smallest magnitude are False."""
    rows = jnp.moveaxis(jnp.abs(w), layer_axis, 0)
    shape = rows.shape
    rows = rows.reshape(shape[0], -1)  # (L, n)
    n = rows.shape[1]
    pruned = jnp.floor(sparsity * n + 0.5).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(rows, axis=-1, stable=True), axis=-1)  # (L, n): 0 = smallest
    return jnp.moveaxis((ranks >= pruned).reshape(shape), 0, layer_axis)


def _n_m_mask(w, n: int, m: int, axis: int):
    """Of every m consecutive weights along `axis`, the n largest in magnitude are True."""
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)  # (..., W/m, m)
    ranks = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1)
    return jnp.moveaxis((ranks >= m - n).reshape(moved.shape), -1, axis)


def _rules(param_axes, params, schedule: Schedule) -> list:
    """Per parameter leaf (in tree order): None (dense) or a function (weight, sparsity) -> mask."""
    axes_leaves = jax.tree.leaves(param_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = [leaf.shape for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))]
    rules = []
    for axes, shape in zip(axes_leaves, shapes, strict=True):
        axes = tuple(axes)
        if not prunable(axes):
            rules.append(None)
        elif schedule.method == "magnitude":
            layer_axis = axes.index("layers")
            rules.append(lambda w, s, a=layer_axis: _magnitude_mask(w, s, a))
        else:
            axis = contracted_axes(axes)[-1]
            if shape[axis] % schedule.m:
                raise ConfigError(f"optim.prune_m={schedule.m} does not divide the {axes[axis]} width {shape[axis]}; "
                                  "N:M groups run along the contracted axis")
            rules.append(lambda w, s, a=axis: _n_m_mask(w, schedule.n, schedule.m, a))
    return rules


def prune(schedule: Schedule, param_axes) -> optax.GradientTransformation:
    """The pruning transformation for parameters whose logical axes are `param_axes` (a tree of
    PartitionSpecs of logical names, as `nnx.get_partition_spec` gives)."""
    schedule.validate()

    def init(params):
        _rules(param_axes, params, schedule)  # refuses an N:M group that does not divide a width
        return PruneState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("pruning needs the parameters: call update(updates, state, params)")
        rules = _rules(param_axes, params, schedule)
        step = state.count
        flat_u, treedef = jax.tree.flatten(updates)
        flat_p, flat_m = jax.tree.leaves(params), jax.tree.leaves(state.masks)
        dense = [p + u for p, u in zip(flat_p, flat_u)]  # the weights after the unpruned update

        def new_masks():
            sparsity = schedule.target(step)
            return [m if rule is None else rule(w, sparsity) for rule, w, m in zip(rules, dense, flat_m)]

        masks = jax.lax.cond(schedule.updates_masks(step), new_masks, lambda: list(flat_m))
        pruned = [u if rule is None else jnp.where(m, u, -p).astype(u.dtype)
                  for rule, u, p, m in zip(rules, flat_u, flat_p, masks)]
        return (jax.tree.unflatten(treedef, pruned),
                PruneState(optax.safe_int32_increment(step), jax.tree.unflatten(treedef, masks)))

    return optax.GradientTransformation(init, update)


def layer_sparsity(params, param_axes) -> dict[str, list[float]]:
    """{parameter name: [fraction of exact zeros in each layer]} for the prunable weights (a quantized
    weight counts its zero values)."""
    report = {}
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_axes = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_spec)[0]
    values = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    for (path, axes), value in zip(flat_axes, values, strict=True):
        axes = tuple(axes)
        if not prunable(axes):
            continue
        array = np.asarray(value.qvalue if isinstance(value, QArray) else value)
        rows = np.moveaxis(array, axes.index("layers"), 0).reshape(array.shape[axes.index("layers")], -1)
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        report[name.removesuffix("/value")] = [float(f) for f in (rows == 0).mean(axis=1)]
    return report
