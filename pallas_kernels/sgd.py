"""Fused SGD with optional heavy-ball or Nesterov momentum as one Pallas pass per leaf.

Momentum as in `optax.sgd` / `optax.trace` (Sutskever et al. 2013):
    trace = g + momentum * trace;  direction = g + momentum * trace if nesterov else trace
    update = -lr * direction
One pass reads the gradient, the trace and (for low-precision leaves) the fp32
master and the parameter, and writes the trace, master and update.

The transformation returns *updates* (new_param - param), not new parameters, so
it composes with `optax.apply_updates` and `optax.chain` like `optax.sgd`. The
trace is aliased to its output (`input_output_aliases`) for in-place reuse.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from pallas_kernels import blocking, factory, leafwise, sharded

__all__ = ["SGD", "SgdState", "sgd", "sgd_reference", "sgd_transformation"]

NEG_LR = 0  # row of the hyperparameter tile


class SgdState(NamedTuple):
    count: jax.Array  # () int32: steps taken (drives the learning-rate schedule)
    trace: optax.Updates  # fp32 momentum per leaf; MaskedNode per leaf when momentum is None
    master: optax.Params  # fp32 copy of each low-precision leaf; MaskedNode for fp32 leaves


def sgd_direction(grad, trace, *, momentum, nesterov):
    """(direction, new trace) in fp32; trace is None without momentum. Same operation order as optax.trace."""
    g = grad.astype(jnp.float32)
    if momentum is None:
        return g, None
    trace = g + momentum * trace
    return (g + momentum * trace if nesterov else trace), trace


# ---------------------------------------------------------------- kernel


def _sgd_kernel(hyper_ref, *refs, momentum, nesterov, has_master):
    # in:  grad, [trace], [master, param]   out: update, [trace], [master]
    # every ref is a (block_rows, 128) block; hyper_ref is the (8, 128) tile.
    has_trace = momentum is not None
    refs = iter(refs)
    grad_ref = next(refs)
    trace_ref = next(refs) if has_trace else None
    master_ref, param_ref = (next(refs), next(refs)) if has_master else (None, None)
    update_ref = next(refs)
    trace_out_ref = next(refs) if has_trace else None
    master_out_ref = next(refs) if has_master else None

    neg_lr = hyper_ref[NEG_LR : NEG_LR + 1, :]  # (1, 128)
    direction, trace = sgd_direction(
        grad_ref[...], trace_ref[...] if has_trace else None, momentum=momentum, nesterov=nesterov
    )
    update, master = leafwise.apply_step(
        neg_lr * direction,
        param_ref[...] if has_master else None,
        master_ref[...] if has_master else None,
        update_ref.dtype,
    )
    update_ref[...] = update
    if has_trace:
        trace_out_ref[...] = trace
    if has_master:
        master_out_ref[...] = master


# ---------------------------------------------------------------- wrapper


def _sgd_leaf_pallas(grad, trace, master, param, *, hyper, momentum, nesterov, block_sizes, interpret):
    param_dtype = grad.dtype if param is None else param.dtype
    if grad.size == 0:
        return jnp.zeros(grad.shape, param_dtype), trace, master
    view = blocking.BlockView.of(grad.size, block_sizes)
    has_trace = momentum is not None
    has_master = leafwise.is_present(master)
    inputs = [grad] + ([trace] if has_trace else []) + ([master, param] if has_master else [])
    outputs = blocking.blockwise_call(
        functools.partial(_sgd_kernel, momentum=momentum, nesterov=nesterov, has_master=has_master),
        blocking.hyper_tile(*hyper),
        [view.to_blocks(x) for x in inputs],
        view=view,
        out_dtypes=[param_dtype] + [jnp.float32] * (has_trace + has_master),
        input_output_aliases=({1: 1} if has_trace else {}) | ({1 + has_trace: 1 + has_trace} if has_master else {}),
        interpret=interpret,
        name="fused_sgd",
    )
    outputs = iter([view.from_blocks(y, grad.shape) for y in outputs])
    update = next(outputs)
    trace = next(outputs) if has_trace else trace
    master = next(outputs) if has_master else master
    return update, trace, master


def sgd_transformation(leaf_update, *, learning_rate, momentum, master_weights, mesh, param_specs):
    """The optax transformation around an SGD leaf rule `leaf_update(grad, trace, master, param, *, hyper)`
    -> (update, trace, master); the trace is MaskedNode without momentum."""
    learning_rate_fn = leafwise.as_schedule(learning_rate)

    def init(params):
        zeros = (lambda p: jnp.zeros(p.shape, jnp.float32)) if momentum is not None else (lambda p: leafwise.MASKED)
        return SgdState(
            count=jnp.zeros([], jnp.int32),
            trace=jax.tree.map(zeros, params),
            master=leafwise.init_master(params, master_weights),
        )

    def update_leaves(grads, state, params, specs):
        del specs  # elementwise: a shard needs nothing from the others
        needs_params = any(leafwise.is_present(m) for m in jax.tree.structure(grads).flatten_up_to(state.master))
        if params is None and needs_params:
            raise ValueError("sgd with master weights needs the current params: call update(grads, state, params)")
        updates, trace, master = leafwise.map_leaves(
            functools.partial(leaf_update, hyper=(-learning_rate_fn(state.count),)),
            grads,
            grads,
            state.trace,
            state.master,
            jax.tree.map(lambda _: None, grads) if params is None else params,
            num_outputs=3,
        )
        return updates, SgdState(count=optax.safe_increment(state.count), trace=trace, master=master)

    if mesh is None:
        if param_specs is not None:
            raise ValueError("param_specs given without mesh; pass both to shard the update, or neither")
        return optax.GradientTransformation(init, lambda g, s, p=None: update_leaves(g, s, p, None))

    def state_specs(state):
        return SgdState(
            count=PartitionSpec(),
            trace=sharded.per_leaf_specs(state.trace, param_specs),
            master=sharded.per_leaf_specs(state.master, param_specs),
        )

    update = sharded.shard_map_update(update_leaves, mesh=mesh, param_specs=param_specs, state_specs=state_specs)
    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------- reference


def _sgd_leaf_reference(grad, trace, master, param, *, hyper, momentum, nesterov):
    has_master = leafwise.is_present(master)
    direction, new_trace = sgd_direction(grad, trace, momentum=momentum, nesterov=nesterov)
    update, new_master = leafwise.apply_step(
        hyper[NEG_LR] * direction,
        param,
        master if has_master else None,
        grad.dtype if param is None else param.dtype,
    )
    return update, trace if new_trace is None else new_trace, new_master if has_master else master


# ---------------------------------------------------------------- optax factories


SGD = factory.Rules(
    name="sgd",
    title="SGD (heavy-ball or Nesterov momentum)",
    fp32_state="trace",
    defaults=dict(momentum=None, nesterov=False),
    leaf_args=("momentum", "nesterov"),
    transformation_args=("momentum",),
    kernel=_sgd_leaf_pallas,
    reference=_sgd_leaf_reference,
    transformation=sgd_transformation,
)
sgd = factory.make(SGD, "pallas")
sgd_reference = factory.make(SGD, "reference")
