"""Ring attention (Liu et al. 2023): each device keeps its T/S queries and passes its key/value block,
with the block's segment ids and positions, round the `sequence` axis with `ppermute`; S steps later
every query has met every key. Memory per device stays O(T/S): the backward pass recomputes each
block's scores from the saved log-sum-exp (FlashAttention-2) while the blocks, now carrying their
dK/dV, go round the ring once more and arrive back at their owners.

Each step sends the next block before computing on the current one, so XLA can overlap the transfer
with the compute. Block maths and the skipping of dead sub-blocks: `llmx.attention.blockwise`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmx.attention import blockwise as bw
from llmx.attention.sharded import shard_over_mesh


def ring_attention(q, k, v, segment_ids, positions, *, axis: str):
    """q (B, T, H, Dh), k, v (B, T, K, Dh), segment ids and positions (B, T), T split over `axis`."""
    return shard_over_mesh(functools.partial(_ring, axis=axis), q, k, v, segment_ids, positions)


def _ring(q, k, v, seg, pos, *, axis):
    return _ring_attention(q, k, v, seg, pos, axis, jax.lax.axis_size(axis))


def _next(size: int):
    return [(i, (i + 1) % size) for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_attention(q, k, v, seg, pos, axis, size):
    return _forward(q, k, v, seg, pos, axis, size)[0]


def _forward(q, k, v, seg, pos, axis, size):
    K, Dh = k.shape[2], q.shape[-1]
    qg = bw.group_heads(q * Dh**-0.5, K)  # (B, K, G, n, Dh)

    def step(state, _):
        carry, block = state
        incoming = jax.lax.ppermute(block, axis, _next(size))  # in flight while this block is computed
        return (bw.forward_block(carry, qg, seg, pos, *block), incoming), None

    (carry, block), _ = jax.lax.scan(step, (bw.init_carry(qg), (k, v, seg, pos)), None, length=size - 1)
    out, lse = bw.finish(bw.forward_block(carry, qg, seg, pos, *block), q.dtype)
    out = bw.ungroup_heads(out)  # (B, n, H, Dh)
    return out, (q, k, v, seg, pos, out, lse)


def _backward(axis, size, residuals, dout):
    q, k, v, seg, pos, out, lse = residuals
    K, Dh = k.shape[2], q.shape[-1]
    scale = Dh**-0.5
    qg, dog = bw.group_heads(q * scale, K), bw.group_heads(dout, K)
    delta = jnp.sum(dog.astype(jnp.float32) * bw.group_heads(out, K).astype(jnp.float32), axis=-1)  # (B, K, G, n)

    def step(state, _):
        dq, block, dkv = state
        incoming = jax.lax.ppermute(block, axis, _next(size))
        dq_b, dk_b, dv_b = bw.backward_block(qg, seg, pos, *block, dog, lse, delta)
        # The block's gradients travel with it: after the last step one more hop brings them home.
        dkv = jax.lax.ppermute((dkv[0] + dk_b, dkv[1] + dv_b), axis, _next(size))
        return (dq + dq_b, incoming, dkv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    state = (jnp.zeros(qg.shape, jnp.float32), (k, v, seg, pos), (zeros, zeros))
    (dq, block, dkv), _ = jax.lax.scan(step, state, None, length=size - 1)
    (dq, _, (dk, dv)), _ = step((dq, block, dkv), None)
    dq = bw.ungroup_heads(dq * scale).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_forward, _backward)
