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

import jax.numpy as jnp

from pallas_kernels import blocking, factory, leafwise, sharded
from pallas_kernels.adamw import NEG_LR, AdamWState, adam_direction, adam_transformation

__all__ = ["LAMB", "LambState", "lamb", "lamb_reference"]

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


def _lamb_leaf_pallas(
    grad, mu, nu, master, param, decay, spec, *, hyper, b1, b2, eps, eps_root, block_sizes, interpret
):
    if grad.size == 0:
        return jnp.zeros_like(param), mu, nu, master
    view = blocking.BlockView.of(grad.size, block_sizes)
    has_master = leafwise.is_present(master)
    weight = master if has_master else param
    mu, nu, direction, sums = blocking.blockwise_call(
        functools.partial(_lamb_kernel, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay, view=view),
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


# ---------------------------------------------------------------- reference


def _lamb_leaf_reference(grad, mu, nu, master, param, decay, spec, *, hyper, b1, b2, eps, eps_root):
    has_master = leafwise.is_present(master)
    weight = master if has_master else param.astype(jnp.float32)
    direction, mu, nu = adam_direction(
        grad, mu, nu, weight, hyper, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay
    )
    weight_sq = sharded.sum_over_shards(jnp.sum(weight * weight), spec)
    direction_sq = sharded.sum_over_shards(jnp.sum(direction * direction), spec)
    step = trust_ratio_step(direction, weight_sq, direction_sq, hyper[NEG_LR])
    update, new_master = leafwise.apply_step(step, param, master if has_master else None, param.dtype)
    return update, mu, nu, new_master if has_master else master


# ---------------------------------------------------------------- optax factories


LAMB = factory.Rules(
    name="lamb",
    title="LAMB (You et al. 2020)",
    fp32_state="moments",
    defaults=dict(b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None),
    leaf_args=("b1", "b2", "eps", "eps_root"),
    transformation_args=("b1", "b2", "weight_decay", "mask"),
    kernel=_lamb_leaf_pallas,
    reference=_lamb_leaf_reference,
    transformation=adam_transformation,
)
lamb = factory.make(LAMB, "pallas")
lamb_reference = factory.make(LAMB, "reference")
