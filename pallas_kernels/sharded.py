"""Run a fused optimizer update under `jax.shard_map`, so each device updates only its shard.

A Pallas kernel is an opaque custom call to the SPMD partitioner: under plain `jit`
with sharded arguments XLA would gather every leaf to every device (Mosaic refuses
outright: "Mosaic kernels cannot be automatically partitioned"). Wrapping the
update in `shard_map` hands each device its local block instead (ZeRO, Rajbhandari
et al. 2020, §5: each rank updates the optimizer-state partition it owns).

`param_specs` are the PartitionSpecs the optimizer state is sharded with, one per
parameter leaf; the moments and master weights use the same spec as their
parameter, the step count is replicated.
- ZeRO-1/2: parameters (and gradients) may be replicated while `param_specs` shard
  the state; `shard_map` slices the replicated inputs locally (no communication)
  and the sharded updates are all-gathered where they meet the replicated params.
- ZeRO-3: parameters, gradients and state all use `param_specs`; no communication.
Whole-tensor reductions (LAMB's norms) are summed over the mesh axes a leaf is
split on with `psum` (`sum_over_shards`).

jax 0.10.2 needs `check_vma=False` for a `pallas_call` inside `shard_map`.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import leafwise

UpdateFn = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


def spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """Mesh axis names a leaf with this spec is split over."""
    axes: list[str] = []
    for entry in spec:
        if entry is not None:
            axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(axes)


def sum_over_shards(partial: jax.Array, spec: PartitionSpec) -> jax.Array:
    """Inside shard_map: a per-shard sum of a leaf with `spec` -> the whole leaf's sum on every device."""
    axes = spec_axes(spec)
    return jax.lax.psum(partial, axes) if axes else partial


def replicated_specs(tree: Any) -> Any:
    """Specs for the unsharded path: nothing is split, so `sum_over_shards` is the identity."""
    return jax.tree.map(lambda _: PartitionSpec(), tree)


def per_leaf_specs(tree: Any, param_specs: Any) -> Any:
    """Specs of a per-parameter state tree (moments, master copies): the parameter's spec,
    or MaskedNode where the state holds none for that leaf."""
    return jax.tree.map(lambda spec, x: spec if leafwise.is_present(x) else x, param_specs, tree)


def shard_map_update(
    update_fn: UpdateFn,
    *,
    mesh: Mesh,
    param_specs: Any,
    state_specs: Callable[[Any], Any],
) -> Callable[..., tuple[Any, Any]]:
    """Wrap `update_fn(grads, state, params, specs)` in shard_map over `mesh`.

    `state_specs(state)` gives the spec tree of the state (it depends on which
    leaves have master copies). Returns an optax-style `update(grads, state, params)`.
    """

    def update(grads, state, params=None):
        specs_of_state = state_specs(state)

        def local_update(local_grads, local_state, local_params):
            return update_fn(local_grads, local_state, local_params, param_specs)

        return jax.shard_map(
            local_update,
            mesh=mesh,
            in_specs=(param_specs, specs_of_state, None if params is None else param_specs),
            out_specs=(param_specs, specs_of_state),
            check_vma=False,
        )(grads, state, params)

    return update
