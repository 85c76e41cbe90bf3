"""The device mesh, the one table that maps logical axes to mesh axes, and the shardings of the
train state it implies.

Mesh axes come from `llmx.axes` (outermost first: `pipeline` stages, `data` pure replicas, `fsdp` the ZeRO
group, `expert` expert parallelism, `sequence` context parallelism, `tensor` Megatron). The batch is split
over the batch axes (data, fsdp, expert), each sequence over `sequence`; the layer stack over the pipeline
stages (`llmx.pipeline`); a mixture of experts' experts over `expert`. The ZeRO stage decides which copies of
the weights also split their `embed` axis over the ZeRO axes (fsdp, expert, sequence) (Rajbhandari et al.
2020, ZeRO §5): stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the parameters. With data > 1 that is hybrid
sharding: ZeRO inside a group, replicas across groups (DeepSpeed's MiCS / hpZ).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llmx import axes
from llmx.config import MeshConfig
from llmx.errors import ConfigError

log = logging.getLogger(__name__)

# logical axis -> mesh axes. Activations and weights share the table except for `embed`, which only
# weights split (over the ZeRO axes, by stage; see weight_rules): activations keep the full model width.
# The layer stack is split over pipeline stages; outside the stack (embedding, logits, loss) the stages
# split the rows as well, last, so that is a local slice of the batch axes' rows (`llmx.pipeline`).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": (*axes.BATCH_AXES, "pipeline"),
    "seq": "sequence",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": "pipeline",
    "experts": "expert",  # a mixture of experts' stacked experts (llmx.models.moe)
}

WEIGHT_ROLES = ("params", "grads", "opt_state")


def weight_rules(zero_stage: int, role: str) -> dict:
    """The rules for one copy of the weights: `params`, `grads` or `opt_state` (ZeRO §5)."""
    sharded_from_stage = {"opt_state": 1, "grads": 2, "params": 3}[role]
    return {**RULES, "embed": axes.ZERO_AXES if zero_stage >= sharded_from_stage else None}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 entry filled; a product that is not the device count is a ConfigError."""
    sizes = axes.configured_sizes(cfg)
    known = math.prod(v for v in sizes.values() if v != -1)
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if n_devices % known:
            raise ConfigError(
                f"mesh {axes.describe(sizes)} cannot fill {n_devices} devices: {known} does not divide {n_devices}"
            )
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        product = " x ".join(f"mesh.{name}" for name in sizes)
        raise ConfigError(
            f"mesh {axes.describe(sizes)} has {math.prod(sizes.values())} devices but {n_devices} are available; "
            f"make {product} = {n_devices} (or set one of them to -1)"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    device_grid = np.asarray(devices).reshape([sizes[a] for a in axes.NAMES])
    return Mesh(device_grid, axes.NAMES, axis_types=(AxisType.Auto,) * len(axes.NAMES))


def logical_to_spec(logical_axes, shape, rules: dict, mesh: Mesh, *, exclude=frozenset()) -> P:
    """A PartitionSpec for an array with these logical axes; a dimension split over the longest prefix of
    its mesh axes that divides it, or whole (e.g. 2 KV heads on tensor=4). Mesh axes in `exclude` are
    never used."""
    spec = []
    used: set[str] = set(exclude)
    for name, dim in zip(logical_axes, shape):
        axes = rules.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # the outer axes that divide it (rows over data, fsdp but not pipeline)
        if not axes:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("llmx_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """While tracing under this context, `constrain` pins activations to the mesh through RULES."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` (kernels that run per shard need it)."""
    return _ACTIVE_MESH.get()


def traced_platform() -> str:
    """The platform being traced for: the enclosing `activation_sharding` mesh's (an AOT compile for
    a TPU or GPU target traces on a CPU host), else the default backend's."""
    mesh = _ACTIVE_MESH.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x, logical_axes):
    """`with_sharding_constraint` by logical axis names; a no-op outside `activation_sharding`. Inside
    a `shard_map` the axes it maps by hand (the pipeline's stages) are left out: each device already
    holds its own block along them."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    context = jax.sharding.get_abstract_mesh()
    if context.manual_axes:  # inside a shard_map the constraint is on its mesh, with those axes manual
        mesh = context
    spec = logical_to_spec(logical_axes, x.shape, RULES, mesh, exclude=context.manual_axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------- the train state's shardings


def weight_shardings(abstract_params: nnx.State, mesh: Mesh, *, zero_stage: int, role: str):
    """NamedShardings for one copy of the weights (params, grads or opt_state moments). A parameter
    whose value is several arrays (a quantized weight's values and scales) splits each by its axes."""
    rules = weight_rules(zero_stage, role)
    logical = nnx.get_partition_spec(abstract_params)  # PartitionSpecs of logical names
    return jax.tree.map(
        lambda spec, value: jax.tree.map(
            lambda leaf: NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, rules, mesh)), value),
        logical,
        abstract_params,
    )


def opt_state_shardings(abstract_opt_state, abstract_params, moment_shardings, mesh: Mesh):
    """Every sub-tree of the optimizer state shaped like the params (moments, master weights) is
    sharded like `moment_shardings`; everything else (step counts, scalars) is replicated."""
    params_def = jax.tree.structure(abstract_params)

    def is_params_like(node):
        return isinstance(node, nnx.State) and jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: moment_shardings if is_params_like(node) else replicated(mesh),
        abstract_opt_state,
        is_leaf=is_params_like,
    )


def offloaded(opt_shardings, *, offload: bool):
    """(optimizer-state shardings between steps, a function the step calls to bring the state into
    device memory). With `offload` on GPU/TPU the state rests in pinned host memory (ZeRO-Offload,
    Ren et al. 2021, keeps it on the host too); on CPU host and device memory are one, so it is a no-op."""
    leaves = jax.tree.leaves(opt_shardings)
    if not offload or not leaves or leaves[0].mesh.devices.flat[0].platform == "cpu":
        if offload:
            log.info("mesh.offload_optimizer: CPU devices already hold the optimizer state in host memory (no-op)")
        return opt_shardings, lambda opt_state: opt_state
    host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    device = jax.tree.map(lambda s: s.with_memory_kind("device"), opt_shardings)
    return host, lambda opt_state: jax.device_put(opt_state, device)


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) into these, and
    ahead-of-time compiles lower against them."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
