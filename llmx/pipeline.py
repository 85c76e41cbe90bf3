"""Pipeline parallelism: the layer stack split into stages over the `pipeline` mesh axis, with the step's
micro-batches streamed through them (GPipe, Huang et al. 2019) and circular repeats (the interleaved
schedule of Narayanan et al. 2021, in the form of MaxText's pipeline layer).

Layout. The stack's L layers stay in model order, (L, ...) split over `pipeline` (RULES `layers`), so a
checkpoint does not depend on the mesh. The schedule views them as (R, S, Lps): chunk (r, s) = layers
[(r*S + s)*Lps, (r*S + s + 1)*Lps) runs on stage s in repeat r, so a micro-batch passes stages 0..S-1 R
times. With R = 1 that view is each stage's own block; with R > 1 a stage holds R non-contiguous chunks,
which the step moves into place (an exchange over `pipeline`) before its first iteration.

Schedule. Iteration t = 0 .. R*M + S - 2: stage s works on item w = t - s (repeat w // M, micro-batch
w % M) when 0 <= w < R*M and idles otherwise; the idle share is the bubble (S - 1) / (R*M + S - 1). Every
stage's output moves one stage on (`ppermute` in a ring); what the last stage sends round to stage 0 is
kept in a buffer of M micro-batches that stage 0 reads its next input from: at first the embedded
micro-batches, then the previous repeat's outputs, and at the end the stack's outputs. With M >= S an
output is back at stage 0 before it is needed (`Config.check_pipeline`).

The whole loop runs under `shard_map` over `pipeline` only: each device runs one stage (the vmap over
stages is the shard_map itself), and the data-parallel and tensor axes inside a stage are left to the
partitioner. Each iteration is rematerialised: its backward recomputes the stage from the saved stage
input, so only the inputs of the R*M + S - 1 iterations are kept. Under ZeRO-3 a stage's weights can be
gathered over fsdp once per step and held through the loop (`mesh.pipeline_gather_weights_once`), where
ZeRO-3 alone would gather each layer again for every micro-batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmx import axes
from llmx import mesh as mesh_lib
from llmx.config import Config
from llmx.models.layers import REMAT_POLICIES, run_layers

AXIS = "pipeline"
# The checkpoint name of a stage's input in an iteration: the one value each iteration keeps for backward.
STAGE_INPUT = "pipeline_stage_input"


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: int  # S, the pipeline mesh axis
    repeats: int  # R, chunks per stage (circular)
    micro_batches: int  # M, train.grad_accum_steps

    @property
    def iterations(self) -> int:
        """Loop iterations of one step: R*M items per stage, plus S - 1 to fill and drain the pipe."""
        return self.repeats * self.micro_batches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The share of stage-iterations spent idle: (S - 1) / (R*M + S - 1) (GPipe §2.2; / R circular)."""
        return (self.stages - 1) / self.iterations


def schedule(cfg: Config, mesh: Mesh) -> Schedule | None:
    """The step's pipeline schedule on `mesh`, checked against the config's arithmetic; None without stages."""
    stages = mesh.shape[AXIS]
    cfg.check_pipeline(stages)
    if stages == 1:
        return None
    return Schedule(stages=stages, repeats=cfg.mesh.pipeline_repeats, micro_batches=cfg.train.grad_accum_steps)


def gathers_weights_once(cfg: Config) -> bool:
    """Only ZeRO-3 shards the parameters over fsdp; below it a stage's weights are whole already."""
    return cfg.mesh.pipeline_gather_weights_once and cfg.mesh.zero_stage == 3


def _iteration_policy(remat: str, platform: str):
    """Keep each iteration's stage input; and inside it, what model.remat saves of a layer (none and full
    save nothing more: the iteration is recomputed from its input either way)."""
    keep_input = jax.checkpoint_policies.save_only_these_names(STAGE_INPUT)
    if remat in ("none", "full"):
        return keep_input
    layer_policy = REMAT_POLICIES[remat](platform)

    def policy(prim, *args, **params):  # either; the layer policy's answer may be "offload"
        return True if keep_input(prim, *args, **params) else layer_policy(prim, *args, **params)

    return policy


def _to_micro(a, M: int):
    """(N, ...) rows -> (M, N/M, ...): micro-batch m holds rows i*M + m (the step lays a batch's A
    micro-batches out as rows b*A + a, llmx.step), so each micro-batch keeps every device's share."""
    return jnp.swapaxes(a.reshape(a.shape[0] // M, M, *a.shape[1:]), 0, 1)


def _to_rows(a):
    """(M, N/M, ...) -> (N, ...), the inverse of `_to_micro`."""
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _varying(a, names):
    """`a` typed as varying over the manual axes `names` (a scan carry must keep one type)."""
    missing = tuple(n for n in names if n not in jax.typeof(a).manual_axis_type.varying)
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _manual_part(spec: P, manual) -> P:
    """The entries of `spec` that name manual axes (a shard_map's in_specs may name no other)."""
    def keep(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        names = tuple(n for n in names if n in manual)
        return None if not names else names[0] if len(names) == 1 else names

    return P(*(keep(e) for e in spec))


def _gather(w, spec: P, *, leading: int = 0):
    """A weight gathered whole along every dimension `spec` splits over manual axes (ZeRO-3's gather; its
    transpose reduce-scatters the gradient). `spec` is per layer; `leading` dimensions come before."""
    for dim, names in enumerate(spec):
        if names is not None:
            w = jax.lax.all_gather(w, names, axis=leading + dim, tiled=True)
    return w


def run_pipeline(
    blocks: nnx.Module, layer_fn: Callable, carry: Any, *, scan: str | bool, remat: str,
    sched: Schedule, mesh: Mesh, param_rules: dict, gather_once: bool,
) -> Any:
    """The `llmx.models.layers.run_stack` contract on a pipelined mesh: `layer_fn(block, carry, None) ->
    (carry, None)` over every layer of `blocks` (Params stacked on a leading (L,) axis), `carry` a pytree
    of (N, ...) arrays whose N rows are the step's M micro-batches (`_to_micro`); returns the last carry.

    The loop is manual over the stages and the batch axes: rows stay on their devices, each weight's
    gradient is summed over the micro-batches where it is computed and reduced over the batch axes once,
    at the end (where the partitioner, left to itself, all-reduced it in every iteration); the tensor
    axis inside a stage is left to the partitioner. `param_rules` lay the weights out as the step holds
    them; under ZeRO-3 a stage gathers its fsdp shards once, before the loop, and reduce-scatters their
    gradients once after it (`gather_once`), or gathers layer by layer in every iteration."""
    S, R, M = sched.stages, sched.repeats, sched.micro_batches
    items = R * M
    manual = (AXIS, *axes.BATCH_AXES)
    graphdef, stacked = nnx.split(blocks)
    # Per weight: the mesh axes of its per-layer dimensions as the step holds it, and their manual part.
    layer_specs = jax.tree.map(
        lambda spec, w: mesh_lib.logical_to_spec(tuple(spec)[1:], w.shape[1:], param_rules, mesh, exclude={AXIS}),
        nnx.get_partition_spec(stacked), stacked,
    )
    shards = jax.tree.map(lambda spec: _manual_part(spec, manual), layer_specs)
    # ZeRO-3's gathers: of a stage's chunks (R, Lps, ...) as the loop starts, or of each layer as it runs.
    identity = lambda tree: tree  # noqa: E731
    gather_all = lambda tree: jax.tree.map(functools.partial(_gather, leading=2), tree, shards)  # noqa: E731
    gather_layer = lambda tree: jax.tree.map(_gather, tree, shards)  # noqa: E731
    gather_stage, gather_layer = (gather_all, identity) if gather_once else (identity, gather_layer)

    def to_stages(w, spec):  # (L, ...) -> (R, S, Lps, ...), the stage axis over pipeline
        w = w.reshape(R, S, w.shape[0] // (R * S), *w.shape[1:])
        return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(None, AXIS, None, *spec)))

    staged = jax.tree.map(to_stages, stacked, layer_specs)
    micro = jax.tree.map(functools.partial(_to_micro, M=M), carry)  # leaves (M, N/M, ...)
    ring = [(i, (i + 1) % S) for i in range(S)]
    policy = _iteration_policy(remat, mesh_lib.traced_platform())

    def stage_program(staged, micro):
        # Per device: staged leaves (R, 1, Lps, ...) (this stage's chunks, whole or ZeRO-3 shards),
        # micro leaves (M, b, ...) (this device's rows of every micro-batch).
        s = jax.lax.axis_index(AXIS)
        # (R, Lps, ...), typed varying over the batch axes here, once: the transpose of that cast (the sum
        # of the weights' gradients over the batch axes) then runs once after the loop, not per iteration.
        chunks = jax.tree.map(lambda w: _varying(w, manual), gather_stage(jax.tree.map(lambda w: w[:, 0], staged)))

        def iteration(loop, t):
            state, buffer = loop  # state: what the previous stage sent; buffer: stage 0's M micro-batches
            item = jnp.clip(t - s, 0, items - 1)  # outside [0, R*M) this stage idles (its output is never read)
            x = jax.tree.map(lambda first, sent: jnp.where(s == 0, first, sent), _index(buffer, item % M), state)
            x = jax.ad_checkpoint.checkpoint_name(x, STAGE_INPUT)
            # This repeat's Lps layers (with one repeat a static index: no copy of the stage's weights).
            chunk = nnx.merge(graphdef, _index(chunks, item // M if R > 1 else 0))
            y, _ = run_layers(chunk, layer_fn, x, scan=scan, remat=remat, prepare=gather_layer)
            y = jax.lax.ppermute(y, AXIS, ring)  # one stage on; the last stage's output to stage 0
            done = t - (S - 1)  # the item the last stage finished in this iteration
            slot = jnp.clip(done, 0, items - 1) % M
            keep = (s == 0) & (done >= 0)

            def store(buf, out):  # buffer[slot] = out on stage 0 once the last stage has produced it
                old = jax.lax.dynamic_index_in_dim(buf, slot, keepdims=False)
                return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, out, old), slot, 0)

            return (y, jax.tree.map(store, buffer, y)), None

        iteration = jax.checkpoint(iteration, policy=policy, prevent_cse=False)
        buffer = jax.tree.map(lambda a: _varying(a, manual), micro)
        state = jax.tree.map(lambda a: _varying(jnp.zeros_like(a[0]), manual), micro)
        (_, buffer), _ = jax.lax.scan(iteration, (state, buffer), jnp.arange(sched.iterations))
        # The outputs are on stage 0: hand them to every stage (the head splits the rows over stages).
        return jax.tree.map(lambda b: jax.lax.psum(jnp.where(s == 0, b, jnp.zeros_like(b)), AXIS), buffer)

    rows = P(None, axes.BATCH_AXES)  # (M, N/M, ...): the rows over the batch axes
    out = jax.shard_map(
        stage_program, mesh=mesh, axis_names=set(manual),
        in_specs=(jax.tree.map(lambda spec: P(None, AXIS, None, *spec), shards), rows), out_specs=rows,
    )(staged, micro)
    return jax.tree.map(_to_rows, out)


def runner(cfg: Config, mesh: Mesh, sched: Schedule) -> Callable:
    """The `llmx.models.layers.stack_runner` of the train step on a pipelined mesh."""
    rules = mesh_lib.weight_rules(cfg.mesh.zero_stage, "params")
    return functools.partial(run_pipeline, sched=sched, mesh=mesh, param_rules=rules, gather_once=gathers_weights_once(cfg))


def stack_bytes(abstract_params) -> int:
    """Bytes of the stacked layers' parameters (the leaves whose first logical axis is `layers`)."""
    specs = nnx.get_partition_spec(abstract_params)
    sizes = jax.tree.map(
        lambda spec, leaf: math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize if tuple(spec)[:1] == ("layers",) else 0,
        specs, abstract_params,
    )
    return sum(jax.tree.leaves(sizes))


def traffic(cfg: Config, mesh: Mesh, sched: Schedule, abstract_params) -> dict:
    """The schedule and the bytes one device sends per step, from shapes: activations between stages
    (each iteration's stage output forward and its gradient backward, segment ids and positions with
    them), the weights ZeRO-3 gathers inside a stage, and with R > 1 the exchange that brings a stage
    its non-contiguous chunks (parameters in, gradients out); beside what FSDP alone over the same
    devices would gather: every layer's weights in the forward and again in the backward (ZeRO §7)."""
    S, R = sched.stages, sched.repeats
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    act_bytes = jnp.dtype("float32" if cfg.model.dtype == "auto" else cfg.model.dtype).itemsize
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len  # a micro-batch's rows on one device
    stage = stack_bytes(abstract_params) / tensor / S  # one stage's weights, per tensor shard
    zero3 = cfg.mesh.zero_stage == 3 and fsdp > 1
    gathered = 0.0
    if zero3:
        # Once per step; else every iteration gathers its chunk, forward and (recomputed) backward.
        times = 1 if gathers_weights_once(cfg) else 2 * sched.iterations / R
        gathered = times * stage * (fsdp - 1) / fsdp
    held = stage / fsdp if cfg.mesh.zero_stage == 3 else stage
    group = mesh.size // tensor  # FSDP alone: every device but the tensor split in one ZeRO-3 group
    return {
        "stages": S, "repeats": R, "micro_batches": sched.micro_batches, "iterations": sched.iterations,
        "bubble": sched.bubble,
        "sent_bytes_per_device": {
            "activations": sched.iterations * tokens * (2 * cfg.model.d_model * act_bytes + 2 * 4),
            "stage_weight_gathers": gathered,
            "circular_exchange": 2 * held * (R - 1) / R,
        },
        "fsdp_alone_weight_gathers": 2 * S * stage * (group - 1) / group,
    }


def describe_traffic(t: dict) -> str:
    """Two lines for the start-up log and the plan."""
    sent = t["sent_bytes_per_device"]
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    return (
        f"pipeline: {t['stages']} stages x {t['repeats']} repeats, {t['micro_batches']} micro-batches, "
        f"{t['iterations']} iterations, bubble (S-1)/(R*M+S-1) = {t['bubble']:.1%}\n"
        f"  sent per device per step: activations {mib(sent['activations'])}, stage weight gathers "
        f"{mib(sent['stage_weight_gathers'])}, circular exchange {mib(sent['circular_exchange'])}; "
        f"FSDP alone would gather {mib(t['fsdp_alone_weight_gathers'])} of weights"
    )
