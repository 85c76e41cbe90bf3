"""From a per-leaf fused update rule to a whole-pytree optax transformation.

The pieces every optimizer here shares: fp32 master weights for low-precision
leaves, learning-rate / weight-decay schedules, the weight-decay mask, and mapping
a leaf function over several aligned pytrees.

Master weights (DeepSpeed FusedAdam / mixed-precision training, Micikevicius et al.
2018): with `master_weights=True` (the default) every floating leaf narrower than
fp32 (bf16, fp16) gets an fp32 copy in the optimizer state. The kernel reads that
copy, writes the new copy and moments in the same pass, and emits the update
`cast(new_master) - param` in the parameter's dtype, so `optax.apply_updates`
lands on the cast of the master (up to one rounding of that difference, which
never accumulates: the next step measures from the actual parameter again).
fp32 leaves never get a copy; `master_weights=False` updates low-precision leaves
directly, rounding the parameter every step.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

MASKED = optax.MaskedNode()  # stands in the state for a leaf with no master copy (or no momentum)


def as_schedule(value: float | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    return value if callable(value) else (lambda count: jnp.asarray(value, jnp.float32))


def decay_mask(mask: Any, params: Any) -> Any:
    """The weight-decay mask as a full tree of Python bools (optax semantics: a tree, a prefix tree, or a callable)."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if callable(mask):
        mask = mask(params)
    return jax.tree.map(lambda m, subtree: jax.tree.map(lambda _: bool(m), subtree), mask, params)


def wants_master(x: jax.Array, master_weights: bool) -> bool:
    return master_weights and jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4


def init_master(params: Any, master_weights: bool) -> Any:
    return jax.tree.map(lambda p: p.astype(jnp.float32) if wants_master(p, master_weights) else MASKED, params)


def is_present(x: Any) -> bool:
    """False for the MaskedNode that stands in the state for a leaf without a master copy / momentum."""
    return not isinstance(x, optax.MaskedNode)


def apply_step(step: jax.Array, param: jax.Array | None, master: jax.Array | None, param_dtype: jnp.dtype):
    """Turn an fp32 `step` (new = old + step) into (update in param dtype, new master or None).

    Shared by the kernels (on blocks) and the references (on whole leaves).
    """
    if master is None:
        return step.astype(param_dtype), None
    new_master = master + step
    new_param = new_master.astype(param_dtype).astype(jnp.float32)
    return (new_param - param.astype(jnp.float32)).astype(param_dtype), new_master


def map_leaves(fn: Callable[..., tuple], like: Any, *trees: Any, num_outputs: int) -> tuple:
    """Apply `fn` to aligned leaves of `trees` (each shaped like `like` or with `like` as prefix).

    `fn` returns a `num_outputs`-tuple; the result is a tuple of trees shaped like
    `like`. A MaskedNode in a tree reaches `fn` whole, and may be returned.
    """
    treedef = jax.tree.structure(like)
    columns = [treedef.flatten_up_to(tree) for tree in trees]
    rows = [fn(*args) for args in zip(*columns, strict=True)]
    outputs = list(zip(*rows, strict=True)) if rows else [()] * num_outputs
    return tuple(treedef.unflatten(list(column)) for column in outputs)
