"""Causal self-attention as einsums XLA fuses on any backend, with the causal upper triangle skipped
block-wise."""

from __future__ import annotations

import jax.numpy as jnp

from llmx.attention.mask import attention_mask, masked_attention


# Query blocks of at least this many rows for the block-causal split below, and at most this many
# blocks: on XLA:CPU two 128-row blocks of a 256-token sequence made the bench model's step ~8 % faster,
# four 64-row blocks made it slower (smaller dots, more concatenation).
MIN_QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 4


def causal_blocks(T: int) -> int:
    """How many query blocks `xla_attention` splits a length-T self-attention into."""
    n = min(T // MIN_QUERY_BLOCK, MAX_QUERY_BLOCKS)
    while n > 1 and T % n:
        n -= 1
    return max(n, 1)


def xla_attention(q, k, v, segment_ids):
    """Self-attention in query blocks: block i attends only keys [0, end of block i), because every
    later key is in its future. With n blocks that computes (n + 1) / 2n of the T x T scores (3/4 for
    two), exactly: the skipped keys would have been masked to zero weight."""
    mask = attention_mask(segment_ids, segment_ids)
    T = q.shape[1]
    n = causal_blocks(T)
    if n == 1:
        return masked_attention(q, k, v, mask)
    size = T // n
    blocks = []
    for i in range(n):
        rows, keys = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
        blocks.append(masked_attention(q[:, rows], k[:, keys], v[:, keys], mask[:, rows, keys]))
    return jnp.concatenate(blocks, axis=1)
