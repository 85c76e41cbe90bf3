"""Causal, document-masked attention kernels, one per `model.attention` value.

Every implementation maps q (B, T, H, Dh) and k, v (B, S, K, Dh) in the compute dtype, with
segment ids (B, T) of packed documents, to the output (B, T, H, Dh) in the compute dtype: token t
attends to keys s <= t of its own document. Softmax statistics are fp32 in all of them.

- xla: einsums XLA fuses anywhere (and the only one for decoding with a cache: `masked_attention`),
  with the causal upper triangle skipped block-wise.
- cudnn: cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- splash: the Pallas splash-attention kernel that ships with JAX (TPU), with segment ids.

Adding a kernel (e.g. sequence-parallel ring or Ulysses attention): a module here with
`fn(q, k, v, segment_ids) -> out` of the signature above, an entry in `ATTENTION` and the value in
the choices of `ModelConfig.attention`. A kernel that runs per shard gets the mesh from
`llmx.mesh.active_mesh()` while the model is traced (see splash.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from llmx import mesh as mesh_lib
from llmx.attention.cudnn import cudnn_attention
from llmx.attention.mask import attention_mask, masked_attention
from llmx.attention.splash import splash_attention
from llmx.attention.xla import causal_blocks, xla_attention
from llmx.errors import ConfigError

__all__ = [
    "ATTENTION",
    "AUTO",
    "attention_mask",
    "causal_blocks",
    "cudnn_attention",
    "masked_attention",
    "resolve",
    "splash_attention",
    "xla_attention",
]

ATTENTION = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}
# model.attention=auto by the platform the model is traced for: the mesh's (an AOT plan for a TPU or
# GPU target traces on a CPU host and gets that target's kernel), never the host's default backend.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


def resolve(name: str, dtype, platform: str | None = None) -> str:
    """The implementation `model.attention=name` means for `platform` (None: the platform being traced
    for, `llmx.mesh.traced_platform`); cuDNN's flash kernel is bf16/fp16 only."""
    low_precision = jnp.dtype(dtype) != jnp.float32
    if name == "auto":
        name = AUTO.get(platform or mesh_lib.traced_platform(), "xla")
        return name if name != "cudnn" or low_precision else "xla"
    if name == "cudnn" and not low_precision:
        raise ConfigError("model.attention=cudnn needs bf16 or fp16 compute; set train.precision=bf16 or use xla")
    return name
