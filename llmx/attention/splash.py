"""The Pallas splash-attention kernel that ships with JAX (TPU), with segment ids, per shard under a mesh."""

from __future__ import annotations

import functools
import math

import jax

from llmx.attention.sharded import whole_sequences_over_mesh
from llmx.errors import ConfigError


def _splash_block(T: int) -> int:
    return math.gcd(T, 512)


def splash_kernel(q, k, v, segment_ids, *, interpret: bool = False):
    """Splash attention on one device's whole sequences (inside a shard_map: this one's, or Ulysses')."""
    # Imported on first use, not with llmx.attention: it adds ~0.5 s to every import for a TPU-only kernel.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, heads, Dh = q.shape
    block = _splash_block(T)
    if block % 128:
        raise ConfigError(f"model.attention=splash needs model.seq_len a multiple of 128 (got {T}); use xla")
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    # (B, T, N, Dh) -> (B, N, T, Dh): the kernel takes one sequence's heads, so vmap over batch.
    out = jax.vmap(kernel)(
        (q * Dh**-0.5).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids=ids
    )
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly), per shard under a mesh."""
    return whole_sequences_over_mesh(functools.partial(splash_kernel, interpret=interpret), q, k, v, segment_ids)
