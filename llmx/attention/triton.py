"""Flash attention with document masks in Triton: the Pallas GPU kernel that ships with JAX
(`jax.experimental.pallas.ops.gpu.attention.mha`), per shard under a mesh.

Why beside cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` takes packed documents only as
a (B, 1, T, T) mask, so its memory grows with T^2 (at 62k tokens the mask alone outweighs the rest of a
1B model's activations on an H100). This kernel reads segment ids block by block, so memory stays
O(T) and long packed sequences fit; cuDNN stays the faster choice at ordinary lengths (`auto`).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from llmx.attention.sharded import whole_sequences_over_mesh
from llmx.errors import ConfigError


def triton_kernel(q, k, v, segment_ids, *, interpret: bool = False):
    """Triton flash attention on one device's whole sequences (inside a shard_map: this one's, or Ulysses')."""
    # Imported on first use: a GPU-only kernel need not slow every `import llmx.attention`.
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    B, T, heads, Dh = q.shape
    block = math.gcd(T, 128)
    if block < 32:
        raise ConfigError(f"model.attention=triton needs model.seq_len a multiple of 32 (got {T}); use xla")
    if k.shape[2] != heads:  # the kernel reads K/V head h for query head h: repeat each KV head for its group
        k, v = (jnp.repeat(x, heads // k.shape[2], axis=2) for x in (k, v))
    # The fused backward pass needs as many dQ query blocks as dK/dV key blocks.
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=32, block_kv_dkv=32,
                                        block_q_dq=32, block_kv_dq=32)
    out = pallas_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=Dh**-0.5, causal=True,
                               block_sizes=sizes, interpret=interpret)
    return out.astype(q.dtype)


def triton_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Triton flash attention (GPU; `interpret=True` runs it anywhere, slowly), per shard under a mesh."""
    return whole_sequences_over_mesh(functools.partial(triton_kernel, interpret=interpret), q, k, v, segment_ids)
