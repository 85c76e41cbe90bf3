"""Attention one block of keys at a time, with an online softmax: the core of ring and all-gather
sequence parallelism (Liu et al. 2023, Ring Attention; the update rule and the recomputing backward
pass of FlashAttention-2, Dao 2023, Alg. 1 and 2).

A device's queries (its T/S tokens) meet the keys block by block; every block pair is split into
`split x split` sub-blocks, and a sub-block whose mask is all False (every key in the future of every
query, or in another document) is skipped by `lax.cond`. That skip is what causal load balancing pays
off in: with the dual-chunk-swap order each device has the same number of live sub-blocks
(`live_blocks` counts them). Masks come from segment ids and positions (`position_mask`), never from
token order.

Layouts: queries grouped by KV head, q (B, K, G, t, Dh) with G = H / K, already scaled by Dh^-1/2;
keys and values as the model makes them, (B, s, K, Dh). Statistics and accumulators are fp32.
The carry of a query block is (o (B, K, G, t, Dh), m (B, K, G, t) running max, l (B, K, G, t) running sum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmx.attention.mask import position_mask

NEG = jnp.finfo(jnp.float32).min  # a finite -inf: exp(NEG - NEG) stays defined for rows with no key yet


def group_heads(x, kv_heads: int):
    """(B, t, H, Dh) -> (B, K, G, t, Dh)."""
    B, t, H, Dh = x.shape
    return x.reshape(B, t, kv_heads, H // kv_heads, Dh).transpose(0, 2, 3, 1, 4)


def ungroup_heads(x):
    """(B, K, G, t, Dh) -> (B, t, H, Dh)."""
    B, K, G, t, Dh = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, t, K * G, Dh)


def split_for(length: int) -> int:
    """Sub-blocks per block: two (a load-balanced device holds two chunks) when the length allows."""
    return 2 if length % 2 == 0 else 1


def init_carry(q):
    B, K, G, t, Dh = q.shape
    return jnp.zeros((B, K, G, t, Dh), jnp.float32), jnp.full((B, K, G, t), NEG), jnp.zeros((B, K, G, t), jnp.float32)


def _pieces(length: int, split: int) -> list[slice]:
    size = length // split
    return [slice(i * size, (i + 1) * size) for i in range(split)]


def _update(carry, q, k, v, mask):
    """One sub-block into the carry (FlashAttention-2 Alg. 1, lines 8-10). mask (B, t, s)."""
    o, m, l = carry
    live = mask[:, None, None]  # (B, 1, 1, t, s)
    scores = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(live, scores, NEG)
    m_new = jnp.maximum(m, scores.max(-1))  # (B, K, G, t)
    probs = jnp.where(live, jnp.exp(scores - m_new[..., None]), 0.0)  # masked keys add nothing, even in an empty row
    rescale = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o * rescale[..., None] + pv, m_new, l * rescale + probs.sum(-1)


def forward_block(carry, q, q_seg, q_pos, k, v, k_seg, k_pos):
    """The carry of query block q (B, K, G, t, Dh) after the key block k, v (B, s, K, Dh), sub-block by
    sub-block, skipping dead ones."""
    o, m, l = carry
    q_parts, k_parts = _pieces(q.shape[3], split_for(q.shape[3])), _pieces(k.shape[1], split_for(k.shape[1]))
    outs = []
    for qs in q_parts:
        part = (o[:, :, :, qs], m[:, :, :, qs], l[:, :, :, qs])
        for ks in k_parts:
            mask = position_mask(q_seg[:, qs], q_pos[:, qs], k_seg[:, ks], k_pos[:, ks])  # (B, t, s)
            part = jax.lax.cond(
                mask.any(), _update, lambda c, *_: c, part, q[:, :, :, qs], k[:, ks], v[:, ks], mask
            )
        outs.append(part)
    return tuple(jnp.concatenate([p[i] for p in outs], axis=3) for i in range(3))


def finish(carry, dtype):
    """(output (B, K, G, t, Dh) in `dtype`, log-sum-exp (B, K, G, t) fp32) of a complete carry."""
    o, m, l = carry
    return (o / l[..., None]).astype(dtype), m + jnp.log(l)


def _grads(q, k, v, mask, do, lse, delta):
    """Gradients of one sub-block (FlashAttention-2 Alg. 2, lines 11-20): dq (B, K, G, t, Dh) w.r.t. the
    scaled queries, dk, dv (B, s, K, Dh), all fp32."""
    scores = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jnp.where(mask[:, None, None], jnp.exp(scores - lse[..., None]), 0.0)  # (B, K, G, t, s)
    dv = jnp.einsum("bkgts,bkgtd->bskd", probs.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("bkgtd,bskd->bkgts", do, v, preferred_element_type=jnp.float32)
    dscores = (probs * (dprobs - delta[..., None])).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->bkgtd", dscores, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,bkgtd->bskd", dscores, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def backward_block(q, q_seg, q_pos, k, v, k_seg, k_pos, do, lse, delta):
    """(dq (B, K, G, t, Dh), dk, dv (B, s, K, Dh)) fp32 of query block q against key block k, v, given
    the output's cotangent do (B, K, G, t, Dh), the forward's lse and delta = rowsum(do * out)."""
    q_parts, k_parts = _pieces(q.shape[3], split_for(q.shape[3])), _pieces(k.shape[1], split_for(k.shape[1]))
    B, K, G, t, Dh = q.shape
    dq = [jnp.zeros((B, K, G, qs.stop - qs.start, Dh), jnp.float32) for qs in q_parts]
    dk = [jnp.zeros((B, ks.stop - ks.start, K, Dh), jnp.float32) for ks in k_parts]
    dv = [jnp.zeros_like(x) for x in dk]
    for i, qs in enumerate(q_parts):
        for j, ks in enumerate(k_parts):
            mask = position_mask(q_seg[:, qs], q_pos[:, qs], k_seg[:, ks], k_pos[:, ks])
            zeros = (jnp.zeros_like(dq[i]), jnp.zeros_like(dk[j]), jnp.zeros_like(dv[j]))
            g = jax.lax.cond(
                mask.any(), _grads, lambda *_: zeros,
                q[:, :, :, qs], k[:, ks], v[:, ks], mask, do[:, :, :, qs], lse[..., qs], delta[..., qs],
            )
            dq[i], dk[j], dv[j] = dq[i] + g[0], dk[j] + g[1], dv[j] + g[2]
    return jnp.concatenate(dq, axis=3), jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1)


def live_blocks(q_seg, q_pos, k_seg, k_pos) -> int:
    """How many sub-blocks of this block pair `forward_block` computes (the rest it skips)."""
    q_parts, k_parts = _pieces(q_seg.shape[1], split_for(q_seg.shape[1])), _pieces(k_seg.shape[1], split_for(k_seg.shape[1]))
    return sum(
        bool(position_mask(q_seg[:, qs], q_pos[:, qs], k_seg[:, ks], k_pos[:, ks]).any())
        for qs in q_parts for ks in k_parts
    )
