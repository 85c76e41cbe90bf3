"""Causal, document-masked attention kernels, one per `model.attention` value, and the
sequence-parallel strategies around them (one per `mesh.sequence_strategy`).

Every implementation maps q (B, T, H, Dh) and k, v (B, S, K, Dh) in the compute dtype, with
segment ids (B, T) of packed documents, to the output (B, T, H, Dh) in the compute dtype: token t
attends to keys s <= t of its own document. Softmax statistics are fp32 in all of them.

- xla: einsums XLA fuses anywhere (and the only one for decoding with a cache: `masked_attention`),
  with the causal upper triangle skipped block-wise.
- cudnn: cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- splash: the Pallas splash-attention kernel that ships with JAX (TPU), with segment ids.
- triton: the Pallas/Triton flash-attention kernel that ships with JAX (GPU), with segment ids: O(T)
  memory where cuDNN's document mask is O(T^2), for long packed sequences.
- cpu: llmx's own flash-attention kernel for XLA:CPU (C++ through XLA FFI, built on first use:
  cpu.py), on one-device CPU meshes; `auto` takes it there when its cached probe beats xla.

With the sequence split over the `sequence` mesh axis (`llmx.attention.parallel`), `kernel` returns a
strategy instead, which also takes the tokens' positions (B, T): the mask comes from positions and
segment ids, so load-balanced token orders work.
- all_gather (gather.py): K/V gathered, queries stay split; blockwise XLA attention.
- ring (ring.py): K/V blocks passed round the axis with ppermute; blockwise XLA attention.
- ulysses (ulysses.py): all-to-all to whole sequences of H/S heads, any kernel above per device.

Adding a kernel: a module here with `fn(q, k, v, segment_ids) -> out` of the signature above, an
entry in `ATTENTION` (and `LOCAL` if it is usable on one shard's arrays inside Ulysses) and the value
in the choices of `ModelConfig.attention`. A kernel that runs per shard gets the mesh from
`llmx.mesh.active_mesh()` while the model is traced (see splash.py).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp

from llmx import mesh as mesh_lib
from llmx.attention import cpu as cpu_kernel
from llmx.attention.cpu import flash_cpu_attention
from llmx.attention.cudnn import cudnn_attention
from llmx.attention.gather import gathered_attention
from llmx.attention.mask import attention_mask, masked_attention, position_mask
from llmx.attention.parallel import SequenceParallel, active, sequence_parallel
from llmx.attention.ring import ring_attention
from llmx.attention.splash import splash_attention, splash_kernel
from llmx.attention.triton import triton_attention, triton_kernel
from llmx.attention.ulysses import ulysses_attention
from llmx.attention.xla import causal_blocks, xla_attention
from llmx.errors import ConfigError

__all__ = [
    "ATTENTION",
    "AUTO",
    "attention_mask",
    "LOCAL",
    "SEQUENCE_KERNELS",
    "SEQUENCE_PARALLEL",
    "SequenceParallel",
    "causal_blocks",
    "cudnn_attention",
    "flash_cpu_attention",
    "gathered_attention",
    "kernel",
    "masked_attention",
    "position_mask",
    "resolve",
    "ring_attention",
    "sequence_parallel",
    "splash_attention",
    "triton_attention",
    "ulysses_attention",
    "xla_attention",
]

ATTENTION = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention, "triton": triton_attention,
             "cpu": flash_cpu_attention}
# The same kernels on one device's whole sequences, for strategies that call them inside their own shard_map.
LOCAL = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_kernel, "triton": triton_kernel}
# mesh.sequence_strategy -> fn(q, k, v, segment_ids, positions, *, axis[, local]).
SEQUENCE_PARALLEL = {"all_gather": gathered_attention, "ring": ring_attention, "ulysses": ulysses_attention}
# The kernels a strategy can run: all_gather and ring compute their own blockwise XLA attention.
SEQUENCE_KERNELS = {"all_gather": ("xla",), "ring": ("xla",), "ulysses": tuple(LOCAL)}
# model.attention=auto by the platform the model is traced for: the mesh's (an AOT plan for a TPU or
# GPU target traces on a CPU host and gets that target's kernel), never the host's default backend.
# A one-device CPU mesh gets the cpu kernel where its probe beat xla (`resolve`).
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


# The fused kernels compile for one kind of platform only (in interpret mode they run anywhere: tests).
PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda"), "triton": ("gpu", "cuda"), "cpu": ("cpu",)}


def _devices(devices: int | None) -> int:
    if devices is not None:
        return devices
    mesh = mesh_lib.active_mesh()
    return 1 if mesh is None else mesh.devices.size


def resolve(name: str, dtype, platform: str | None = None, devices: int | None = None) -> str:
    """The implementation `model.attention=name` means for `platform` with `devices` devices (None: the
    mesh being traced for, `llmx.mesh.active_mesh`, else the default backend); cuDNN's flash kernel is
    bf16/fp16 only, the cpu kernel f32/bf16 on one device."""
    low_precision = jnp.dtype(dtype) != jnp.float32
    platform = platform or mesh_lib.traced_platform()
    if name == "auto":
        if platform == "cpu":
            return "cpu" if _devices(devices) == 1 and cpu_kernel.faster_than_xla(dtype) else "xla"
        name = AUTO.get(platform, "xla")
        return name if name != "cudnn" or low_precision else "xla"
    if name == "cudnn" and not low_precision:
        raise ConfigError("model.attention=cudnn needs bf16 or fp16 compute; set train.precision=bf16 or use xla")
    if name == "cpu":
        if not cpu_kernel.takes(dtype):
            raise ConfigError(f"model.attention=cpu takes fp32 or bf16 compute, not {jnp.dtype(dtype).name}; "
                              "use model.attention=xla")
        if _devices(devices) != 1:
            raise ConfigError(f"model.attention=cpu runs on one CPU device and this mesh has {_devices(devices)}; "
                              "use model.attention=auto or xla")
        if platform == "cpu" and not cpu_kernel.available():
            raise ConfigError(f"model.attention=cpu: {cpu_kernel.unavailable_reason()}; use model.attention=xla")
    return name


def _without_positions(fn: Callable) -> Callable:
    def attend(q, k, v, segment_ids, positions):
        del positions  # tokens in natural order: the kernel's own causal mask holds
        return fn(q, k, v, segment_ids)

    return attend


def _cpu_or_xla(name: str) -> Callable:
    """The cpu kernel where it takes the head size (a multiple of 16), else xla (auto) or an error."""

    def attend(q, k, v, segment_ids):
        if cpu_kernel.supports(q.shape, q.dtype):
            return flash_cpu_attention(q, k, v, segment_ids)
        if name == "cpu":
            raise ConfigError(f"model.attention=cpu needs a head_dim that is a multiple of 16, not {q.shape[-1]}; "
                              "use model.attention=auto or xla")
        return xla_attention(q, k, v, segment_ids)

    return attend


def kernel(name: str, dtype) -> Callable:
    """`attend(q, k, v, segment_ids, positions) -> out` for `model.attention=name` on the platform being
    traced for, inside the active sequence-parallel strategy if any (`sequence_parallel`)."""
    platform = mesh_lib.traced_platform()
    local = resolve(name, dtype, platform)
    if platform not in PLATFORMS.get(local, (platform,)):
        kind = PLATFORMS[local][0].upper()
        raise ConfigError(f"model.attention={local} runs on {kind} only and this step is compiled for {platform}; "
                          f"use model.attention=auto or xla here (llmx.plan --target compiles for a {kind})")
    parallel = active()
    if parallel is None and local == "cpu":
        return _without_positions(_cpu_or_xla(name))
    if parallel is None:
        return _without_positions(ATTENTION[local])
    strategy = SEQUENCE_PARALLEL[parallel.strategy]
    if parallel.strategy == "ulysses":
        return functools.partial(strategy, axis=parallel.axis, local=LOCAL[local])
    return functools.partial(strategy, axis=parallel.axis)
