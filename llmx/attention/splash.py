"""The Pallas splash-attention kernel that ships with JAX (TPU), with segment ids, per shard under a mesh."""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from llmx import mesh as mesh_lib
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
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly). Under a mesh the kernel
    runs per shard through shard_map: batch over (data, fsdp), heads over tensor."""
    per_shard = functools.partial(splash_kernel, interpret=interpret)
    mesh = mesh_lib.active_mesh()
    if mesh is None or mesh.size == 1:
        return per_shard(q, k, v, segment_ids)
    spec = lambda x, axes: mesh_lib.logical_to_spec(axes, x.shape, mesh_lib.RULES, mesh)  # noqa: E731
    q_spec = spec(q, ("batch", None, "heads", "head_dim"))  # whole sequences (sequence > 1 goes through Ulysses)
    kv_spec = spec(k, ("batch", None, "kv_heads", "head_dim"))
    if q_spec[2] != kv_spec[2]:  # heads split but KV heads whole: split neither
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)
