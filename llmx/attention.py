"""Causal, document-masked attention kernels, one per `model.attention` value.

Every implementation maps q (B, T, H, Dh) and k, v (B, S, K, Dh) in the compute dtype, with
segment ids (B, T) of packed documents, to the output (B, T, H, Dh) in the compute dtype: token t
attends to keys s <= t of its own document. Softmax statistics are fp32 in all of them.

- xla: einsums XLA fuses anywhere (and the only one for decoding with a cache: `masked_attention`),
  with the causal upper triangle skipped block-wise.
- cudnn: cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- splash: the Pallas splash-attention kernel that ships with JAX (TPU), with segment ids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmx import mesh as mesh_lib
from llmx.errors import ConfigError
from llmx.matmul import einsum


def attention_mask(q_segments, kv_segments, *, q_offset=0):
    """True where query t may attend key s: same document and not in its future. (B, T, S).

    `q_offset` is the index of the first query within the keys (non-zero when decoding with a cache).
    """
    T, S = q_segments.shape[1], kv_segments.shape[1]
    same_doc = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = jnp.arange(S)[None, :] <= (jnp.arange(T) + q_offset)[:, None]  # (T, S)
    return same_doc & causal[None]


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


def cudnn_attention(q, k, v, segment_ids):
    # cuDNN's causal mask skips the upper triangle; the document mask enters as a (B, 1, T, S) bias.
    same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=True, implementation="cudnn")


def _splash_block(T: int) -> int:
    return math.gcd(T, 512)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly). Under a mesh the kernel
    runs per shard through shard_map: batch over (data, fsdp), heads over tensor."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, H, Dh = q.shape
    block = _splash_block(T)
    if block % 128:
        raise ConfigError(f"model.attention=splash needs model.seq_len a multiple of 128 (got {T}); use xla")
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )

    def per_shard(q, k, v, segment_ids):
        heads = q.shape[2]
        mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * heads)
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        # (B, T, N, Dh) -> (B, N, T, Dh): the kernel takes one sequence's heads, so vmap over batch.
        out = jax.vmap(kernel)(
            (q * Dh**-0.5).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids=ids
        )
        return out.transpose(0, 2, 1, 3).astype(q.dtype)

    mesh = mesh_lib.active_mesh()
    if mesh is None or mesh.size == 1:
        return per_shard(q, k, v, segment_ids)
    spec = lambda x, axes: mesh_lib.logical_to_spec(axes, x.shape, mesh_lib.RULES, mesh)  # noqa: E731
    q_spec = spec(q, ("batch", "seq", "heads", "head_dim"))
    kv_spec = spec(k, ("batch", "seq", "kv_heads", "head_dim"))
    if q_spec[2] != kv_spec[2]:  # heads split but KV heads whole: split neither
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


ATTENTION = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}
# model.attention=auto by the backend the model is traced for (AOT targets: name the kernel).
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


def resolve(name: str, dtype) -> str:
    """The implementation `model.attention=name` means here; cuDNN's flash kernel is bf16/fp16 only."""
    low_precision = jnp.dtype(dtype) != jnp.float32
    if name == "auto":
        name = AUTO.get(jax.default_backend(), "xla")
        return name if name != "cudnn" or low_precision else "xla"
    if name == "cudnn" and not low_precision:
        raise ConfigError("model.attention=cudnn needs bf16 or fp16 compute; set train.precision=bf16 or use xla")
    return name
