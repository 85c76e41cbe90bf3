"""Softmax attention under an explicit mask, and the causal document mask of packed sequences.

The building block of the xla kernel and the only attention for decoding with a KV cache (the
queries sit at an offset into the keys there). Shapes: B batch, T queries, S keys, H query heads,
K key/value heads, G = H / K, Dh head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmx.matmul import einsum


def attention_mask(q_segments, kv_segments, *, q_offset=0):
    """True where query t may attend key s: same document and not in its future. (B, T, S).

    `q_offset` is the index of the first query within the keys (non-zero when decoding with a cache).
    """
    T, S = q_segments.shape[1], kv_segments.shape[1]
    same_doc = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = jnp.arange(S)[None, :] <= (jnp.arange(T) + q_offset)[:, None]  # (T, S)
    return same_doc & causal[None]


def position_mask(q_segments, q_positions, kv_segments, kv_positions):
    """True where query t may attend key s, from segment ids and in-document positions (B, T), (B, S)
    alone: same document and not in its future. (B, T, S).

    It holds in any token order (packed rows restart positions at every document), so sequence-parallel
    kernels use it on load-balanced, reordered tokens."""
    same_doc = q_segments[:, :, None] == kv_segments[:, None, :]
    return same_doc & (kv_positions[:, None, :] <= q_positions[:, :, None])


def masked_attention(q, k, v, mask):
    """Softmax attention of q (B, T, H, Dh) over k, v (B, S, K, Dh) where mask (B, T, S) -> (B, T, H, Dh).

    The dots are 3-D over [B·K, G·T, Dh]: on XLA:CPU they beat 4-D/5-D forms by 10-25 % and the 4-D
    bf16 form fails at run time (DESIGN §6); grouped-query heads share their K/V without a copy.
    """
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    dt = q.dtype
    q = (q * Dh**-0.5).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, Dh)
    k = k.transpose(0, 2, 1, 3).reshape(B * K, S, Dh)  # (B·K, S, Dh)
    v = v.transpose(0, 2, 1, 3).reshape(B * K, S, Dh)
    scores = einsum("bqd,bsd->bqs", q, k).reshape(B, K, G, T, S)  # fp32
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(B * K, G * T, S)
    out = einsum("bqs,bsd->bqd", probs, v)  # (B·K, G·T, Dh) fp32
    return out.astype(dt).reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
