"""All-gather sequence parallelism (MaxText's default context parallelism): queries stay split over the
`sequence` axis, keys and values (with their segment ids and positions) are all-gathered, and each
device attends its T/S queries over the T keys block by block (`llmx.attention.blockwise`, dead
sub-blocks skipped). Autodiff turns the gathers into reduce-scatters of dK/dV.

Simplest of the three and the least memory-frugal: every device holds all T keys and values of its heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmx.attention import blockwise as bw
from llmx.attention.sharded import shard_over_mesh


def gathered_attention(q, k, v, segment_ids, positions, *, axis: str):
    """q (B, T, H, Dh), k, v (B, T, K, Dh), segment ids and positions (B, T), T split over `axis`."""
    return shard_over_mesh(functools.partial(_gathered, axis=axis), q, k, v, segment_ids, positions)


def _gathered(q, k, v, seg, pos, *, axis):
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)  # (B, n, ...) -> (B, T, ...)
    return _blocks_attention(q, gather(k), gather(v), seg, pos, gather(seg), gather(pos), jax.lax.axis_size(axis))


def _blocks(x, n_blocks: int):
    """(B, T, ...) -> (n_blocks, B, T / n_blocks, ...): the scan runs over the first axis."""
    return jnp.moveaxis(x.reshape(x.shape[0], n_blocks, -1, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """(n_blocks, B, t, ...) -> (B, n_blocks·t, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blocks_attention(q, k, v, q_seg, q_pos, k_seg, k_pos, n_blocks):
    return _forward(q, k, v, q_seg, q_pos, k_seg, k_pos, n_blocks)[0]


def _forward(q, k, v, q_seg, q_pos, k_seg, k_pos, n_blocks):
    K, Dh = k.shape[2], q.shape[-1]
    qg = bw.group_heads(q * Dh**-0.5, K)  # (B, K, G, n, Dh)

    def step(carry, block):
        return bw.forward_block(carry, qg, q_seg, q_pos, *block), None

    blocks = tuple(_blocks(x, n_blocks) for x in (k, v, k_seg, k_pos))
    carry, _ = jax.lax.scan(step, bw.init_carry(qg), blocks)
    out, lse = bw.finish(carry, q.dtype)
    out = bw.ungroup_heads(out)
    return out, (q, k, v, q_seg, q_pos, k_seg, k_pos, out, lse)


def _backward(n_blocks, residuals, dout):
    q, k, v, q_seg, q_pos, k_seg, k_pos, out, lse = residuals
    K, Dh = k.shape[2], q.shape[-1]
    scale = Dh**-0.5
    qg, dog = bw.group_heads(q * scale, K), bw.group_heads(dout, K)
    delta = jnp.sum(dog.astype(jnp.float32) * bw.group_heads(out, K).astype(jnp.float32), axis=-1)  # (B, K, G, n)

    def step(dq, block):
        dq_b, dk_b, dv_b = bw.backward_block(qg, q_seg, q_pos, *block, dog, lse, delta)
        return dq + dq_b, (dk_b, dv_b)

    blocks = tuple(_blocks(x, n_blocks) for x in (k, v, k_seg, k_pos))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), blocks)
    dq = bw.ungroup_heads(dq * scale).astype(q.dtype)
    return dq, _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), None, None, None, None


_blocks_attention.defvjp(_forward, _backward)
