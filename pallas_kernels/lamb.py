"""Fused LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Alg. 2).

LAMB scales each leaf's AdamW direction r + λw by the trust ratio ||w|| / ||r + λw||,
which needs whole-tensor norms before any element can be finished. So, as in
DeepSpeed's FusedLamb, a step is two passes:
  1. the kernel: read grad, moments and weight (fp32 master for low-precision
     leaves); write the new moments, the direction, and per-block partial sums of
     ||w||² and ||direction||² (one (8, 128) tile per grid step);
  2. jnp: add the partial sums up (and `psum` them over the mesh axes the leaf is
     split on, under `shard_map`), then update = -lr · ratio · direction, which
     XLA fuses with the slicing back and with `optax.apply_updates`.
Numerics follow `optax.lamb` (scale_by_adam -> add_decayed_weights ->
scale_by_trust_ratio -> scale_by_learning_rate).

The transformation returns *updates* (new_param - param), not new parameters, so
it composes with `optax.apply_updates` and `optax.chain` like `optax.lamb`.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pallas_kernels import blocking, leafwise, sharded
from pallas_kernels.adamw import NEG_LR, AdamWState, adam_direction, adam_transformation
from pallas_kernels.blocking import BlockSizes

__all__ = ["BlockSizes", "LambState", "lamb", "lamb_reference"]

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]

LambState = AdamWState  # same fields: count, fp32 moments, fp32 master copies


def trust_ratio_step(direction, weight_sq, direction_sq, neg_lr):
    """-lr · trust_ratio · direction with ratio = ||w|| / ||direction||, 1 if either norm is 0 (LAMB Alg. 2 line 10)."""
    weight_norm = jnp.sqrt(weight_sq)
    direction_norm = jnp.sqrt(direction_sq)
    ratio = jnp.where((weight_norm == 0.0) | (direction_norm == 0.0), 1.0, weight_norm / direction_norm)
    return neg_lr * (direction * ratio)


# ---------------------------------------------------------------- kernel


def _lamb_kernel(
    hyper_ref,
    grad_ref,
    mu_ref,
    nu_ref,
    weight_ref,
    mu_out_ref,
    nu_out_ref,
    direction_ref,
    sums_ref,
    *,
    b1,
    b2,
    eps,
    eps_root,
    decay,
    view,
):
    # blocks: (block_rows, 128); hyper_ref: (8, 128) tile; sums_ref: (1, 8, 128), row 0 ||w||², row 1 ||d||².
    hyper = [hyper_ref[j : j + 1, :] for j in range(4)]  # each (1, 128)
    weight = weight_ref[...].astype(jnp.float32)
    direction, mu, nu = adam_direction(
        grad_ref[...], mu_ref[...], nu_ref[...], weight, hyper, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay
    )
    mu_out_ref[...] = mu
    nu_out_ref[...] = nu
    direction_ref[...] = direction
    weight_sq, direction_sq = weight * weight, direction * direction
    if view.padded:  # padding is zeros, but eps = 0 would make its direction 0/0
        valid = view.valid_mask()
        weight_sq = jnp.where(valid, weight_sq, 0.0)
        direction_sq = jnp.where(valid, direction_sq, 0.0)
    sums_ref[...] = blocking.partial_sums_tile(blocking.block_sum(weight_sq), blocking.block_sum(direction_sq))


# ---------------------------------------------------------------- wrapper


def _lamb_leaf_pallas(grad, mu, nu, master, param, decay, spec, *, hyper, config, block_sizes, interpret):
    if grad.size == 0:
        return jnp.zeros_like(param), mu, nu, master
    view = blocking.BlockView.of(grad.size, block_sizes)
    has_master = leafwise.is_present(master)
    weight = master if has_master else param
    mu, nu, direction, sums = blocking.blockwise_call(
        functools.partial(_lamb_kernel, **config, decay=decay, view=view),
        blocking.hyper_tile(*hyper),
        [view.to_blocks(x) for x in (grad, mu, nu, weight)],
        view=view,
        out_dtypes=[jnp.float32] * 3,
        input_output_aliases={1: 0, 2: 1},
        num_partial_sums=2,
        interpret=interpret,
        name="fused_lamb",
    )
    mu, nu, direction = [view.from_blocks(y, grad.shape) for y in (mu, nu, direction)]
    weight_sq = sharded.sum_over_shards(jnp.sum(sums[:, 0, 0]), spec)  # sums: (grid, 8, 128)
    direction_sq = sharded.sum_over_shards(jnp.sum(sums[:, 1, 0]), spec)
    step = trust_ratio_step(direction, weight_sq, direction_sq, hyper[NEG_LR])
    update, new_master = leafwise.apply_step(step, param, master if has_master else None, param.dtype)
    return update, mu, nu, new_master if has_master else master


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    master_weights: bool = True,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    mesh: Mesh | None = None,
    param_specs: Any = None,
) -> optax.GradientTransformation:
    """Fused LAMB; a drop-in for `optax.lamb` (same arguments and numerics; moments kept in fp32).

    Returns updates (new_param - param) for `optax.apply_updates`. Low-precision
    leaves keep an fp32 master copy (the trust ratio uses its norm) unless
    `master_weights=False`. With `mesh` and `param_specs` the update runs under
    `jax.shard_map`; each leaf's partial norms are `psum`-ed over the mesh axes in
    its spec. `interpret` and `block_sizes` as in `pallas_kernels.adamw`.
    """
    interpret = blocking.resolve_interpret(interpret)
    block_sizes = block_sizes or BlockSizes.get_default(interpret=interpret)
    config = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    leaf_update = functools.partial(_lamb_leaf_pallas, config=config, block_sizes=block_sizes, interpret=interpret)
    return adam_transformation(
        leaf_update,
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        weight_decay=weight_decay,
        mask=mask,
        master_weights=master_weights,
        mesh=mesh,
        param_specs=param_specs,
    )


# ---------------------------------------------------------------- reference


def _lamb_leaf_reference(grad, mu, nu, master, param, decay, spec, *, hyper, config):
    has_master = leafwise.is_present(master)
    weight = master if has_master else param.astype(jnp.float32)
    direction, mu, nu = adam_direction(grad, mu, nu, weight, hyper, **config, decay=decay)
    weight_sq = sharded.sum_over_shards(jnp.sum(weight * weight), spec)
    direction_sq = sharded.sum_over_shards(jnp.sum(direction * direction), spec)
    step = trust_ratio_step(direction, weight_sq, direction_sq, hyper[NEG_LR])
    update, new_master = leafwise.apply_step(step, param, master if has_master else None, param.dtype)
    return update, mu, nu, new_master if has_master else master


def lamb_reference(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    master_weights: bool = True,
    mesh: Mesh | None = None,
    param_specs: Any = None,
) -> optax.GradientTransformation:
    """`lamb` in plain jnp (same state, master weights and sharding); XLA fuses it, so it is the CPU training path."""
    config = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return adam_transformation(
        functools.partial(_lamb_leaf_reference, config=config),
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        weight_decay=weight_decay,
        mask=mask,
        master_weights=master_weights,
        mesh=mesh,
        param_specs=param_specs,
    )
