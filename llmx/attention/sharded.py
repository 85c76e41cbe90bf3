"""Running a per-device attention over the active mesh with `shard_map`: the shared wrapper of the
sequence-parallel kernels (ring, all_gather, ulysses).

Specs come from the logical-axis rules: batch over the batch axes, tokens over the `seq` rule's axis,
query heads over `heads`'. Key/value heads are split exactly like the query heads, so every device
keeps whole grouped-query groups; where the KV heads do not divide, each is repeated just enough times.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmx import mesh as mesh_lib


def kv_repeats(n_heads: int, n_kv_heads: int, ways: int) -> int:
    """The fewest repeats r of each KV head (r divides H / K, so groups stay whole) that make K·r
    divisible by `ways`, the number of pieces the heads are cut into."""
    group = n_heads // n_kv_heads
    for r in range(1, group + 1):
        if group % r == 0 and (n_kv_heads * r) % ways == 0:
            return r
    raise ValueError(f"{n_heads} heads cannot be split {ways} ways")


def shard_over_mesh(per_shard: Callable, q, k, v, segment_ids, positions, *, head_ways: int = 1):
    """`per_shard(q, k, v, segment_ids, positions) -> out` on each device's block of the arrays (shapes
    as in `llmx.attention`); `head_ways` further cuts per device the heads must survive (Ulysses: the
    sequence size)."""
    mesh = mesh_lib.active_mesh()
    q_spec = mesh_lib.logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, mesh_lib.RULES, mesh)
    heads_split = q_spec[2]
    heads_split = () if heads_split is None else (heads_split,) if isinstance(heads_split, str) else heads_split
    ways = math.prod(mesh.shape[a] for a in heads_split) * head_ways
    repeats = kv_repeats(q.shape[2], k.shape[2], ways)
    if repeats > 1:
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)  # (B, T, K·r, Dh)
    kv_spec = P(q_spec[0], q_spec[1], q_spec[2], None)
    token_spec = P(q_spec[0], q_spec[1])
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids, positions)


def whole_sequences_over_mesh(per_shard: Callable, q, k, v, segment_ids):
    """`per_shard(q, k, v, segment_ids) -> out` on each device's whole sequences, for fused kernels the
    partitioner cannot split (Pallas custom calls): batch over the batch axes, heads over `tensor` where
    the KV heads split too (otherwise neither is split). Sequence parallelism goes through Ulysses."""
    mesh = mesh_lib.active_mesh()
    if mesh is None or mesh.size == 1:
        return per_shard(q, k, v, segment_ids)
    spec = lambda x, axes: mesh_lib.logical_to_spec(axes, x.shape, mesh_lib.RULES, mesh)  # noqa: E731
    q_spec = spec(q, ("batch", None, "heads", "head_dim"))
    kv_spec = spec(k, ("batch", None, "kv_heads", "head_dim"))
    if q_spec[2] != kv_spec[2]:  # heads split but KV heads whole: split neither
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)
