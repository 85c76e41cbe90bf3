"""Sequence (context) parallelism: every sequence split over the `sequence` mesh axis. This module
decides the attention strategy for a config on a mesh, turns impossible combinations into one-line
errors, and gives the load-balanced token order.

Outside attention every op is per token, so splitting the `seq` logical axis over the mesh axis is all
the partitioner needs (`llmx.mesh.RULES`). Attention needs every earlier key of a token's document:
- all_gather: keys and values all-gathered (MaxText's default);
- ring: key/value blocks passed round the axis (Liu et al. 2023), O(T/S) memory per device;
- ulysses: all-to-all to whole sequences of H/S heads (Jacobs et al. 2023, DeepSpeed-Ulysses), so the
  fused kernels (splash on TPU, cuDNN on GPU) run inside; needs n_heads divisible by tensor x sequence.
- auto: ulysses around a fused kernel when the heads divide, else ring.

Causal load balance (all_gather and ring): with tokens in order, device S-1 attends to almost the whole
sequence and device 0 to a sliver. Cutting each sequence into 2S chunks and giving device i chunks i
and 2S-1-i (dual chunk swap, the "zigzag" of ring-flash-attention and MaxText) gives every device the
same work. The host reorders every batch key the same way (`token_order`, applied by
`llmx.batch.to_global`); the attention mask comes from positions and segment ids, and the loss is a sum
over tokens, so nothing outside the step sees the order.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llmx import attention as attention_lib
from llmx.attention import SequenceParallel
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.mesh import RULES

log = logging.getLogger(__name__)

AXIS: str = RULES["seq"]  # the mesh axis sequences are split over
FUSED = ("splash", "cudnn", "triton")  # kernels only Ulysses can run under sequence parallelism


def _compute_dtype(cfg: Config):
    return jnp.dtype("float32" if cfg.model.dtype == "auto" else cfg.model.dtype)


def _heads_ways(mesh: Mesh) -> int:
    """How many ways the query heads are split before Ulysses splits them further."""
    heads = RULES["heads"]
    return int(np.prod([mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ())]))


def resolve(cfg: Config, mesh: Mesh) -> SequenceParallel | None:
    """The sequence parallelism of `cfg` on `mesh` (None when the axis has one device); a ConfigError
    names the problem and the alternatives."""
    size = mesh.shape[AXIS]
    if size == 1:
        return None
    along_axis = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices), mesh.axis_names.index(AXIS), -1)
    if (along_axis != along_axis[..., :1]).any():
        # Each process builds whole rows (llmx.batch.to_global), so a sequence must stay on its devices.
        raise ConfigError(
            f"mesh.sequence={size} spans processes; keep each sequence on one process's devices by making "
            f"the data-parallel size (mesh.data x mesh.fsdp) a multiple of the {jax.process_count()} processes"
        )
    if mesh.shape.get("pipeline", 1) > 1:
        raise ConfigError(f"mesh.sequence={size} with mesh.pipeline={mesh.shape['pipeline']} is not supported yet; "
                          "set one of them to 1")
    model, strategy = cfg.model, cfg.mesh.sequence_strategy
    platform = mesh.devices.flat[0].platform
    local = attention_lib.resolve(model.attention, _compute_dtype(cfg), platform, mesh.devices.size)
    ways = _heads_ways(mesh) * size
    heads_divide = model.n_heads % ways == 0
    if strategy == "auto":
        strategy = "ulysses" if heads_divide and local in FUSED else "ring"
    if strategy == "ulysses" and not heads_divide:
        raise ConfigError(
            f"mesh.sequence_strategy=ulysses splits model.n_heads={model.n_heads} over tensor x sequence = {ways} "
            f"devices, which does not divide them; use mesh.sequence_strategy=ring or all_gather, or a head count "
            f"divisible by {ways}"
        )
    if local not in attention_lib.SEQUENCE_KERNELS[strategy] and model.attention != "auto":
        if cfg.mesh.sequence_strategy == "auto":
            why = f"needs ulysses, which needs model.n_heads={model.n_heads} divisible by tensor x sequence = {ways}"
        else:
            why = f"runs only inside ulysses, not mesh.sequence_strategy={strategy}"
        raise ConfigError(
            f"with mesh.sequence={size}, model.attention={model.attention} {why}; "
            f"use model.attention=xla (all_gather, ring) or mesh.sequence_strategy=ulysses"
        )
    balanced = cfg.mesh.sequence_load_balance and strategy != "ulysses"
    chunks = 2 * size if balanced else size
    if model.seq_len % chunks:
        because = (f"2 x mesh.sequence = {chunks} chunks (mesh.sequence_load_balance=true)" if balanced
                   else f"mesh.sequence={size}")
        raise ConfigError(
            f"model.seq_len={model.seq_len} cannot be split into {because}; use a multiple of {chunks}"
        )
    parallel = SequenceParallel(strategy=strategy, axis=AXIS, size=size, balanced=balanced)
    log.info("sequence parallelism: %s", describe(parallel, local))
    return parallel


def describe(parallel: SequenceParallel, local: str) -> str:
    kernel = f" around the {local} kernel" if parallel.strategy == "ulysses" else ""
    order = "load-balanced (device i: chunks i and 2S-1-i)" if parallel.balanced else "tokens in order"
    return f"{parallel.strategy}{kernel} over {parallel.size} devices, {order}"


def token_order(seq_len: int, parallel: SequenceParallel | None) -> np.ndarray | None:
    """The host-side permutation (T,) of every batch key's tokens: dual chunk swap when balanced, else
    None (natural order). Device i of the axis then holds chunks i and 2S-1-i of 2S."""
    if parallel is None or not parallel.balanced:
        return None
    S = parallel.size
    chunk = seq_len // (2 * S)
    order = [c for i in range(S) for c in (i, 2 * S - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])
