"""DeepSpeed-Ulysses (Jacobs et al. 2023): two all-to-alls per attention over the `sequence` axis. The
first turns "T/S tokens of every head" into "all T tokens of H/S heads", so each device runs an
ordinary attention kernel (xla, or the fused splash / cuDNN ones) on whole sequences; the second
turns the output back. Per device the all-to-all moves O(T/S) values whatever S is.

Tokens stay in their natural order (after the first all-to-all every device sees the whole sequence),
so the work is balanced by construction and the kernel's own causal mask holds.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from llmx.attention.sharded import shard_over_mesh
from llmx.mesh import active_mesh


def ulysses_attention(q, k, v, segment_ids, positions, *, axis: str, local: Callable):
    """q (B, T, H, Dh), k, v (B, T, K, Dh), segment ids (B, T), T split over `axis`; `local(q, k, v,
    segment_ids)` attends whole sequences on one device. Query heads are split over tensor x `axis`
    (KV heads repeated where they do not divide)."""
    return shard_over_mesh(
        functools.partial(_ulysses, axis=axis, local=local), q, k, v, segment_ids, positions,
        head_ways=active_mesh().shape[axis],
    )


def _ulysses(q, k, v, seg, pos, *, axis, local):
    del pos  # natural token order: the local kernel's causal mask is the right one
    # (B, T/S, h, Dh) -> (B, T, h/S, Dh): send head group j to device j, gather its tokens from all.
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    seg = jax.lax.all_gather(seg, axis, axis=1, tiled=True)  # (B, T)
    out = local(to_heads(q), to_heads(k), to_heads(v), seg)  # (B, T, h/S, Dh)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)  # (B, T/S, h, Dh)
