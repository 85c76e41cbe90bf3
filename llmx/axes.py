"""The mesh axes, outermost first: the one table that config validation, mesh construction, batch
layout and their error messages read.

Adding a mesh axis is one entry here, its size field in `llmx.config.MeshConfig` (same name), and its
entries in the logical-axis rules (`llmx.mesh.RULES`). Nothing else names mesh axes by hand.
Pure Python on purpose: `llmx.config` validates against this table without importing jax.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MeshAxis:
    name: str  # the mesh axis and the `mesh.<name>` config key of its size
    splits_batch: bool  # the global batch is split over it (it is a data-parallel axis)
    role: str  # what it is for, in words (help text and messages)
    # ZeRO splits the weights' `embed` axis over it (from the stage of each copy, `llmx.mesh.weight_rules`):
    # every axis whose devices would otherwise hold the same weights and sum the same gradients.
    shards_weights: bool = False


MESH_AXES: tuple[MeshAxis, ...] = (
    # Outermost, so stages span the slowest links (hosts, slices): a pipeline sends activations, not weights.
    MeshAxis("pipeline", splits_batch=False, role="pipeline stages: contiguous slices of the layer stack"),
    MeshAxis("data", splits_batch=True, role="pure data-parallel replicas"),
    MeshAxis("fsdp", splits_batch=True, shards_weights=True, role="the ZeRO/FSDP group: the batch is split over it too"),
    # Expert parallelism (DeepSpeed-MoE, GShard): a mixture of experts' experts are split over it and tokens
    # travel to their experts by all-to-all (`llmx.models.moe`); every other weight is the same on its
    # devices, so it is a data-parallel axis for them, and ZeRO shards them over it as over fsdp.
    MeshAxis("expert", splits_batch=True, shards_weights=True,
             role="expert-parallel group: a mixture of experts' experts split over it, the batch too"),
    # Sequence (context) parallelism sits between fsdp and tensor, where MaxText puts its `context` axis:
    # inner axes get the nearest devices, and after tensor's all-reduce per matmul, attention's per-layer
    # K/V ring or all-to-all is the most frequent traffic; fsdp's weight gathers overlap with compute.
    # Its devices hold the same weights, so ZeRO shards them over it as over fsdp (MaxText's `embed` rule).
    MeshAxis("sequence", splits_batch=False, shards_weights=True,
             role="sequence (context) parallel group: every sequence is split over it"),
    MeshAxis("tensor", splits_batch=False, role="tensor-parallel (Megatron) group"),
)

NAMES: tuple[str, ...] = tuple(axis.name for axis in MESH_AXES)
# The axes the global batch is split over, outermost first (data parallelism in the widest sense).
BATCH_AXES: tuple[str, ...] = tuple(axis.name for axis in MESH_AXES if axis.splits_batch)
# The axes ZeRO shards the weights over: the ZeRO group is their product.
ZERO_AXES: tuple[str, ...] = tuple(axis.name for axis in MESH_AXES if axis.shards_weights)


def configured_sizes(mesh_cfg) -> dict[str, int]:
    """{axis: size} as configured (-1: fill with the devices left over), in mesh order."""
    return {name: getattr(mesh_cfg, name) for name in NAMES}


def single_device() -> dict[str, int]:
    """Mesh config values that put everything on one device."""
    return {name: 1 for name in NAMES}


def data_parallel_size(shape: dict[str, int]) -> int:
    """How many ways the global batch is split on a mesh of this shape."""
    return math.prod(shape[name] for name in BATCH_AXES)


def zero_group_size(shape: dict[str, int]) -> int:
    """How many ways ZeRO splits the weights on a mesh of this shape."""
    return math.prod(shape[name] for name in ZERO_AXES)


def describe(sizes: dict[str, int]) -> str:
    """'data=2xfsdp=4xtensor=1', for messages."""
    return "x".join(f"{name}={size}" for name, size in sizes.items())
