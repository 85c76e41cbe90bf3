"""Fused AdamW (Loshchilov & Hutter 2019, Alg. 2) as one Pallas pass per leaf.

Like DeepSpeed's FusedAdam, each step reads the gradient, both moments and the
weight (the fp32 master copy for low-precision leaves) once, and writes the new
moments, the new master and the update once; nothing in between touches memory.
Numerics follow `optax.adamw` (scale_by_adam -> add_decayed_weights ->
scale_by_learning_rate) operation for operation.

The transformation returns *updates* (new_param - param), not new parameters, so
it composes with `optax.apply_updates` and `optax.chain` like `optax.adamw`.
Moments are aliased to their outputs (`input_output_aliases`) so a donated state
is rewritten in place.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from pallas_kernels import blocking, factory, leafwise, sharded

__all__ = ["ADAMW", "AdamWState", "adam_direction", "adam_transformation", "adamw", "adamw_reference"]

# Rows of the hyperparameter tile (blocking.hyper_tile).
NEG_LR, BIAS_CORRECTION_1, BIAS_CORRECTION_2, WEIGHT_DECAY = range(4)


class AdamWState(NamedTuple):
    count: jax.Array  # () int32: steps taken
    mu: optax.Updates  # fp32 first moments, shaped like params
    nu: optax.Updates  # fp32 second moments, shaped like params
    master: optax.Params  # fp32 copy of each low-precision leaf; MaskedNode for fp32 leaves


def adam_direction(grad, mu, nu, weight, hyper, *, b1, b2, eps, eps_root, decay):
    """Adam's bias-corrected direction plus decoupled weight decay, in fp32: (direction, mu, nu).

    Works on kernel blocks (hyper entries are (1, 128) rows) and on whole leaves
    (hyper entries are scalars). Same operation order as optax.
    """
    g = grad.astype(jnp.float32)
    mu = (1 - b1) * g + b1 * mu
    nu = (1 - b2) * (g * g) + b2 * nu
    mu_hat = mu / hyper[BIAS_CORRECTION_1]
    nu_hat = nu / hyper[BIAS_CORRECTION_2]
    direction = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
    if decay:
        direction = direction + hyper[WEIGHT_DECAY] * weight
    return direction, mu, nu


# ---------------------------------------------------------------- kernel


def _adamw_kernel(hyper_ref, *refs, b1, b2, eps, eps_root, decay, reads_weight, has_master):
    # in:  grad, mu, nu, [weight = master or param], [param]   out: update, mu, nu, [master]
    # every ref is a (block_rows, 128) block; hyper_ref is the (8, 128) tile.
    refs = iter(refs)
    grad_ref, mu_ref, nu_ref = next(refs), next(refs), next(refs)
    weight_ref = next(refs) if reads_weight else None
    param_ref = next(refs) if has_master else None
    update_ref, mu_out_ref, nu_out_ref = next(refs), next(refs), next(refs)
    master_out_ref = next(refs) if has_master else None

    hyper = [hyper_ref[j : j + 1, :] for j in range(4)]  # each (1, 128)
    weight = weight_ref[...].astype(jnp.float32) if reads_weight else None
    direction, mu, nu = adam_direction(
        grad_ref[...], mu_ref[...], nu_ref[...], weight, hyper, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay
    )
    update, master = leafwise.apply_step(
        hyper[NEG_LR] * direction,
        param_ref[...] if has_master else None,
        weight if has_master else None,
        update_ref.dtype,
    )
    update_ref[...] = update
    mu_out_ref[...] = mu
    nu_out_ref[...] = nu
    if has_master:
        master_out_ref[...] = master


# ---------------------------------------------------------------- wrapper


def _adamw_leaf_pallas(
    grad, mu, nu, master, param, decay, spec, *, hyper, b1, b2, eps, eps_root, block_sizes, interpret
):
    del spec  # elementwise: a shard needs nothing from the others
    if grad.size == 0:
        return jnp.zeros_like(param), mu, nu, master
    view = blocking.BlockView.of(grad.size, block_sizes)
    has_master = leafwise.is_present(master)
    reads_weight = decay or has_master
    inputs = (
        [grad, mu, nu] + ([master if has_master else param] if reads_weight else []) + ([param] if has_master else [])
    )
    kernel = functools.partial(
        _adamw_kernel, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay, reads_weight=reads_weight,
        has_master=has_master,
    )
    outputs = blocking.blockwise_call(
        kernel,
        blocking.hyper_tile(*hyper),
        [view.to_blocks(x) for x in inputs],
        view=view,
        out_dtypes=[param.dtype, jnp.float32, jnp.float32] + ([jnp.float32] if has_master else []),
        input_output_aliases={1: 1, 2: 2} | ({3: 3} if has_master else {}),
        interpret=interpret,
        name="fused_adamw",
    )
    update, mu, nu, *new_master = [view.from_blocks(y, grad.shape) for y in outputs]
    return update, mu, nu, new_master[0] if has_master else master


def adam_transformation(
    leaf_update, *, learning_rate, b1, b2, weight_decay, mask, master_weights, mesh, param_specs
) -> optax.GradientTransformation:
    """The optax transformation around an Adam-family leaf rule (AdamW here, LAMB in lamb.py).

    `leaf_update(grad, mu, nu, master, param, decay, spec, *, hyper)` returns
    (update, mu, nu, master); `spec` is the leaf's PartitionSpec inside shard_map
    (P() otherwise), for rules that reduce over the whole leaf.
    """
    learning_rate_fn = leafwise.as_schedule(learning_rate)
    weight_decay_fn = leafwise.as_schedule(weight_decay)
    never_decay = not callable(weight_decay) and weight_decay == 0.0  # optax skips the term entirely

    def init(params):
        def zeros(p):
            return jnp.zeros(p.shape, jnp.float32)

        return AdamWState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
            master=leafwise.init_master(params, master_weights),
        )

    def update_leaves(grads, state, params, specs):
        if params is None:
            raise ValueError("AdamW and LAMB need the current params: call update(grads, state, params)")
        count = optax.safe_increment(state.count)
        hyper = (
            -learning_rate_fn(state.count),
            1 - b1**count,  # bias corrections, Adam (Kingma & Ba 2015) Alg. 1
            1 - b2**count,
            weight_decay_fn(state.count),
        )
        decay = jax.tree.map(lambda _: False, params) if never_decay else leafwise.decay_mask(mask, params)
        updates, mu, nu, master = leafwise.map_leaves(
            functools.partial(leaf_update, hyper=hyper),
            params,
            grads,
            state.mu,
            state.nu,
            state.master,
            params,
            decay,
            sharded.replicated_specs(params) if specs is None else specs,
            num_outputs=4,
        )
        return updates, AdamWState(count=count, mu=mu, nu=nu, master=master)

    if mesh is None:
        if param_specs is not None:
            raise ValueError("param_specs given without mesh; pass both to shard the update, or neither")
        return optax.GradientTransformation(init, lambda g, s, p=None: update_leaves(g, s, p, None))

    def state_specs(state):
        return AdamWState(
            count=PartitionSpec(),
            mu=param_specs,
            nu=param_specs,
            master=sharded.per_leaf_specs(state.master, param_specs),
        )

    update = sharded.shard_map_update(update_leaves, mesh=mesh, param_specs=param_specs, state_specs=state_specs)
    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------- reference


def _adamw_leaf_reference(grad, mu, nu, master, param, decay, spec, *, hyper, b1, b2, eps, eps_root):
    del spec
    has_master = leafwise.is_present(master)
    weight = master if has_master else param.astype(jnp.float32)
    direction, mu, nu = adam_direction(
        grad, mu, nu, weight, hyper, b1=b1, b2=b2, eps=eps, eps_root=eps_root, decay=decay
    )
    update, new_master = leafwise.apply_step(
        hyper[NEG_LR] * direction, param, master if has_master else None, param.dtype
    )
    return update, mu, nu, new_master if has_master else master


# ---------------------------------------------------------------- optax factories


ADAMW = factory.Rules(
    name="adamw",
    title="AdamW (Loshchilov & Hutter 2019)",
    fp32_state="moments",
    defaults=dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4, mask=None),
    leaf_args=("b1", "b2", "eps", "eps_root"),
    transformation_args=("b1", "b2", "weight_decay", "mask"),
    kernel=_adamw_leaf_pallas,
    reference=_adamw_leaf_reference,
    transformation=adam_transformation,
)
adamw = factory.make(ADAMW, "pallas")
adamw_reference = factory.make(ADAMW, "reference")
