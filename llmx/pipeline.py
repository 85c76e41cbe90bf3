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
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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

    def describe(self) -> str:
        return (f"pipeline: {self.stages} stages x {self.repeats} repeats, {self.micro_batches} micro-batches, "
                f"{self.iterations} iterations, bubble {self.bubble:.1%}")


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
    return jax.checkpoint_policies.save_from_both_policies(keep_input, REMAT_POLICIES[remat](platform))


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


def run_pipeline(
    blocks: nnx.Module, layer_fn: Callable, carry: Any, *, scan: bool, remat: str,
    sched: Schedule, mesh: Mesh, weight_rules: dict,
) -> Any:
    """The `llmx.models.layers.run_stack` contract on a pipelined mesh: `layer_fn(block, carry, None) ->
    (carry, None)` over every layer of `blocks` (Params stacked on a leading (L,) axis), `carry` a pytree
    of (N, ...) arrays whose N rows are the step's M micro-batches (`_to_micro`); returns the last carry.
    `weight_rules` say how a stage's weights are laid out over the other axes while the loop runs (the
    params' own rules, or with the weights gathered once, the rules without ZeRO-3's split)."""
    S, R, M = sched.stages, sched.repeats, sched.micro_batches
    items = R * M
    graphdef, stacked = nnx.split(blocks)
    logical = nnx.get_partition_spec(stacked)

    def to_stages(spec, w):  # (L, ...) -> (R, S, Lps, ...), the stage axis over pipeline
        w = w.reshape(R, S, w.shape[0] // (R * S), *w.shape[1:])
        rest = mesh_lib.logical_to_spec(tuple(spec)[1:], w.shape[3:], weight_rules, mesh, exclude={AXIS})
        return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(None, AXIS, None, *rest)))

    staged = jax.tree.map(to_stages, logical, stacked)
    micro = jax.tree.map(functools.partial(_to_micro, M=M), carry)  # leaves (M, N/M, ...)
    ring = [(i, (i + 1) % S) for i in range(S)]
    policy = _iteration_policy(remat, mesh_lib.traced_platform())

    def stage_program(staged, micro):
        # Per device: staged leaves (R, 1, Lps, ...) (this stage's chunks), micro leaves (M, N/M, ...).
        s = jax.lax.axis_index(AXIS)
        chunks = jax.tree.map(lambda w: w[:, 0], staged)  # (R, Lps, ...)

        def iteration(loop, t):
            state, buffer = loop  # state: what the previous stage sent; buffer: stage 0's M micro-batches
            item = jnp.clip(t - s, 0, items - 1)  # outside [0, R*M) this stage idles (its output is never read)
            x = jax.tree.map(lambda first, sent: jnp.where(s == 0, first, sent), _index(buffer, item % M), state)
            x = jax.ad_checkpoint.checkpoint_name(x, STAGE_INPUT)
            chunk = nnx.merge(graphdef, _index(chunks, item // M))  # this repeat's Lps layers
            y, _ = run_layers(chunk, layer_fn, x, scan=scan, remat=remat)
            y = jax.lax.ppermute(y, AXIS, ring)  # one stage on; the last stage's output to stage 0
            done = t - (S - 1)  # the item the last stage finished in this iteration
            slot = jnp.clip(done, 0, items - 1) % M
            keep = (s == 0) & (done >= 0)

            def store(buf, out):  # buffer[slot] = out on stage 0 once the last stage has produced it
                old = jax.lax.dynamic_index_in_dim(buf, slot, keepdims=False)
                return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, out, old), slot, 0)

            return (y, jax.tree.map(store, buffer, y)), None

        iteration = jax.checkpoint(iteration, policy=policy, prevent_cse=False)
        varying = lambda a: jax.lax.pcast(a, AXIS, to="varying")  # noqa: E731
        state = jax.tree.map(lambda a: varying(jnp.zeros_like(a[0])), micro)
        (_, buffer), _ = jax.lax.scan(iteration, (state, jax.tree.map(varying, micro)), jnp.arange(sched.iterations))
        # The outputs are on stage 0: hand them to every stage (the head splits the rows over stages).
        return jax.tree.map(lambda b: jax.lax.psum(jnp.where(s == 0, b, jnp.zeros_like(b)), AXIS), buffer)

    out = jax.shard_map(
        stage_program, mesh=mesh, in_specs=(P(None, AXIS), P()), out_specs=P(), axis_names={AXIS},
    )(staged, micro)
    return jax.tree.map(_to_rows, out)


def runner(cfg: Config, mesh: Mesh, sched: Schedule) -> Callable:
    """The `llmx.models.layers.stack_runner` of the train step on a pipelined mesh."""
    stage = 0 if gathers_weights_once(cfg) else cfg.mesh.zero_stage
    rules = mesh_lib.weight_rules(stage, "params")
    return functools.partial(run_pipeline, sched=sched, mesh=mesh, weight_rules=rules)
