"""The pure training and evaluation steps, and the sharded train state they act on.

`train_step(state, batch) -> (state, metrics)` is jitted once with in/out shardings and a donated
state. Gradients are accumulated over the leading micro-batch axis of `batch` with `lax.scan` (on a
pipelined mesh: in one pass that streams the micro-batches through the stages, `llmx.pipeline`), and
the loss is normalised by the number of target tokens of the whole step, not per micro-batch.
Only the trainable part of the parameters (`llmx.models.lora.partition`: all of them, or the LoRA
adapters) is differentiated and has optimizer state; a frozen base passes through the step unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from llmx import attention as attention_lib
from llmx import batch as batch_lib
from llmx import mesh as mesh_lib
from llmx import models, optim
from llmx import sequence as sequence_lib
from llmx import pipeline as pipeline_lib
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.models.layers import stack_runner
from llmx.loss_scaling import LossScaler, loss_scaler
from llmx.models import lora
from llmx.quantization import stored_builder


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps taken
    params: nnx.State
    opt_state: optax.OptState
    # () int32: steps whose update was dropped for a non-finite loss or gradient (train.on_nan)
    skipped_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    # fp16 loss scaling (llmx.loss_scaling.LossScaleState); None for fp32 and bf16
    loss_scale: Any = None


def loss_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token cross-entropies, number of target tokens) for a (B, T) batch."""
    return _cross_entropy_sums(nnx.merge(graphdef, params), batch)


def objective_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: dict) -> tuple[jax.Array, tuple]:
    """(the sum that is differentiated, (cross-entropy sum, family metrics)) for a (B, T) batch: a family
    with auxiliary losses (a mixture of experts' load balancing) adds its penalty x target tokens, so the
    step's mean over tokens adds the penalty; the others differentiate the cross-entropy sum itself."""
    model = nnx.merge(graphdef, params)
    loss_sum, n_tokens = _cross_entropy_sums(model, batch)
    auxiliary = models.get(model.cfg.family).auxiliary
    if auxiliary is None:
        return loss_sum, (loss_sum, {})
    penalty, metrics = auxiliary(model)
    return loss_sum + penalty * n_tokens, (loss_sum, metrics)


def _cross_entropy_sums(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])  # (B, T, V) fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot contraction instead of a gather keeps vocab-parallel logits local to each shard.
    target_logp = jnp.einsum("btv,btv->bt", logp, jax.nn.one_hot(batch["targets"], logp.shape[-1], dtype=logp.dtype))
    mask = batch["loss_mask"].astype(jnp.float32)  # (B, T)
    return -(target_logp * mask).sum(), mask.sum()


def accumulate_by_scan(grad_fn: Callable, params, batch: dict, grad_shardings) -> tuple[Any, Any]:
    """(summed gradients, summed aux: loss and metrics) of the (A, B, T) batch, one micro-batch after
    another (`lax.scan`)."""

    def accumulate(grad_sum, micro_batch):
        (_, aux), grads = grad_fn(params, micro_batch)
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)  # ZeRO-2: reduce-scatter here
        return jax.tree.map(jnp.add, grad_sum, grads), aux

    zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), grad_shardings)
    grad_sum, micro_aux = jax.lax.scan(accumulate, zeros, batch)
    return grad_sum, jax.tree.map(lambda a: a.sum(0), micro_aux)


def accumulate_in_one_pass(grad_fn: Callable, params, batch: dict, grad_shardings) -> tuple[Any, Any]:
    """(gradients, aux) of the (A, B, T) batch in one forward and backward pass over all its rows: a
    pipelined mesh streams the A micro-batches through its stages (`llmx.pipeline`). Rows are laid out
    b*A + a, so each device keeps its own rows and micro-batch a is every A-th row."""
    rows = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, a.shape[-1]), batch)  # (A, B, T) -> (B*A, T)
    (_, aux), grads = grad_fn(params, rows)
    return jax.lax.with_sharding_constraint(grads, grad_shardings), aux


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    grad_shardings: Any,
    scaler: LossScaler,
    opt_state_to_device: Callable = lambda opt_state: opt_state,
    partition: lora.Partition,
    accumulate: Callable = accumulate_by_scan,
) -> tuple[TrainState, dict]:
    """One optimizer step on a batch of (A, B, T) arrays: A micro-batches of B sequences, their gradients
    summed by `accumulate` (`accumulate_by_scan`, or `accumulate_in_one_pass` on a pipelined mesh)."""
    n_tokens = batch["loss_mask"].astype(jnp.float32).sum()
    inv_tokens = 1.0 / jnp.maximum(n_tokens, 1.0)
    # fp16: differentiate the loss times the loss scale, unscale the gradients (llmx.loss_scaling).
    pre, post = scaler.factors(state.loss_scale, inv_tokens)
    trainable, frozen = partition.split(state.params)  # LoRA: (adapters, frozen base); else (all, None)

    def scaled_loss(trainable, micro_batch):
        objective_sum, aux = objective_sums(partition.merge(trainable, frozen), graphdef, micro_batch)
        return objective_sum * pre, aux

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
    grad_sum, (loss_sum, family_metrics) = accumulate(grad_fn, trainable, batch, grad_shardings)
    n_micro = batch["loss_mask"].shape[0]  # family metrics: the mean over micro-batches
    grads = jax.tree.map(lambda g: g * post, grad_sum)
    old_opt_state = opt_state_to_device(state.opt_state)  # mesh.offload_optimizer: host -> device
    updates, opt_state = tx.update(grads, old_opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    loss, grad_norm = loss_sum * inv_tokens, optax.tree.norm(grads)
    # A non-finite loss or gradient drops the whole update (DeepSpeed's skipped step): a select that
    # XLA fuses into the update, with no host round trip. fp16 overflows take the same path and
    # also lower the loss scale.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_trainable, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (new_trainable, opt_state), (trainable, old_opt_state)
    )
    params = partition.merge(new_trainable, frozen)
    skipped_steps = state.skipped_steps + (~finite).astype(jnp.int32)
    loss_scale = scaler.update(state.loss_scale, finite)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr_schedule(state.step),
        "tokens": n_tokens,
        "skipped_steps": skipped_steps,
        **scaler.metrics(loss_scale),
        **{name: value / n_micro for name, value in family_metrics.items()},
    }
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped_steps, loss_scale=loss_scale
    )
    return new_state, metrics


def eval_step(params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
    return loss_sums(params, graphdef, batch)


@dataclasses.dataclass
class Steps:
    """The model's structure, the state's shardings and the compiled step functions for one mesh."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_state: TrainState
    partition: lora.Partition  # (trainable, frozen) parameters: all trainable, or LoRA adapters on a frozen base
    state_shardings: TrainState
    grad_shardings: Any
    init: Callable[[], TrainState]
    init_from_params: Callable[[nnx.State], TrainState]  # step 0 and a fresh optimizer around given weights
    train: Callable[[TrainState, dict], tuple[TrainState, dict]]
    evaluate: Callable[[nnx.State, dict], tuple[jax.Array, jax.Array]]
    batch_shardings: dict
    eval_batch_shardings: dict
    # The host-side token permutation (T,) of every batch (sequence load balancing), or None.
    token_order: np.ndarray | None = None
    pipeline: pipeline_lib.Schedule | None = None  # the train step's schedule on a pipelined mesh


# Below this many parameters a CPU init compiles at XLA's optimization level 0 (see init_compiler_options).
CPU_QUICK_INIT_MAX_PARAMS = 32_000_000


def init_compiler_options(mesh: Mesh, abstract_params) -> dict | None:
    """XLA options for compiling the initializer. On CPU its compile is nearly all LLVM optimizing one
    threefry kernel per weight, for a program that runs once: at level 0 the test model's init compiles in
    0.8 s instead of 2.2 s and the bench model's (3.4M params) in 0.5 s instead of 3.1 s, while running
    in 0.16 s instead of 0.04 s (AMD EPYC Zen 4, `xla_backend_optimization_level`). That slower run
    outweighs the saved compile from ~70M parameters, hence the bound; accelerators keep their default."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract_params))
    return {"xla_backend_optimization_level": 0} if count <= CPU_QUICK_INIT_MAX_PARAMS else None


def build_steps(cfg: Config, mesh: Mesh) -> Steps:
    """The optimizer, the state's shardings and the jitted step functions for `cfg` on `mesh`."""
    sequence = sequence_lib.resolve(cfg, mesh)  # checked before anything is built
    family = models.get(cfg.model.family)
    # model.weight_format: matmul weights stored quantized (a run written by llmx.quantize)
    build = stored_builder(family.build, cfg.model.weight_format, cfg.model.weight_group)
    schedule = pipeline_lib.schedule(cfg, mesh)
    if schedule is not None and not family.pipelines:
        raise ConfigError(
            f"model.family={family.name} cannot be pipelined (its forward is not one stack of layers); set mesh.pipeline=1"
        )
    abstract_model = nnx.eval_shape(lambda: build(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    lora.check_targets(abstract_params, cfg.model)
    partition = lora.partition(cfg.model)
    stage = cfg.mesh.zero_stage
    param_sh = mesh_lib.weight_shardings(abstract_params, mesh, zero_stage=stage, role="params")
    # Gradients and optimizer state exist for the trainable parameters only.
    grad_sh = partition.split(mesh_lib.weight_shardings(abstract_params, mesh, zero_stage=stage, role="grads"))[0]
    moment_sh = partition.split(mesh_lib.weight_shardings(abstract_params, mesh, zero_stage=stage, role="opt_state"))[0]
    tx, lr_schedule = optim.build(
        cfg.optim, cfg.train.steps, mesh=mesh, state_specs=jax.tree.map(lambda s: s.spec, moment_sh),
        param_axes=partition.split(nnx.get_partition_spec(abstract_params))[0],  # pruning: the trainable ones
    )

    def init() -> TrainState:
        model = build(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        params = nnx.state(model, nnx.Param)
        return init_from_params(params)

    scaler = loss_scaler(cfg.train)

    def init_from_params(params: nnx.State) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero, params=params, opt_state=tx.init(partition.split(params)[0]), skipped_steps=zero,
            loss_scale=scaler.init(),
        )

    abstract_state = jax.eval_shape(init)
    opt_sh, opt_state_to_device = mesh_lib.offloaded(
        mesh_lib.opt_state_shardings(abstract_state.opt_state, partition.split(abstract_params)[0], moment_sh, mesh),
        offload=cfg.mesh.offload_optimizer,
    )
    state_sh = TrainState(
        step=mesh_lib.replicated(mesh),
        params=param_sh,
        opt_state=opt_sh,
        skipped_steps=mesh_lib.replicated(mesh),
        loss_scale=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state.loss_scale),
    )
    batch_sh = batch_lib.train_shardings(mesh)
    eval_batch_sh = batch_lib.eval_shardings(mesh)
    replicated = mesh_lib.replicated(mesh)

    def under_rules(fn, layer_stack=contextlib.nullcontext):
        # Activations are constrained through the rules table and attention runs the sequence-parallel strategy,
        # while `fn` traces (the body of a jitted
        # function runs only then), so the compiled step carries the constraints; `layer_stack` installs
        # the schedule of the layer stack (the pipeline's on a pipelined mesh).
        @functools.wraps(fn)
        def traced(*args):
            with mesh_lib.activation_sharding(mesh), attention_lib.sequence_parallel(sequence), layer_stack():
                return fn(*args)

        return traced

    # On a pipelined mesh the train step's forward streams its micro-batches through the stages in one
    # pass; evaluation and generation run the stack layer by layer (the stages act as data parallelism).
    if schedule is None:
        accumulate, layer_stack = accumulate_by_scan, contextlib.nullcontext
    else:
        accumulate = accumulate_in_one_pass
        layer_stack = functools.partial(stack_runner, pipeline_lib.runner(cfg, mesh, schedule))
    step_fn = functools.partial(
        train_step, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule, grad_shardings=grad_sh, scaler=scaler,
        opt_state_to_device=opt_state_to_device, accumulate=accumulate, partition=partition,
    )
    return Steps(
        mesh=mesh,
        graphdef=graphdef,
        abstract_state=abstract_state,
        partition=partition,
        state_shardings=state_sh,
        grad_shardings=grad_sh,
        init=jax.jit(under_rules(init), out_shardings=state_sh,
                     compiler_options=init_compiler_options(mesh, abstract_params)),
        init_from_params=jax.jit(under_rules(init_from_params), in_shardings=(param_sh,), out_shardings=state_sh),
        train=jax.jit(
            under_rules(step_fn, layer_stack),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        evaluate=jax.jit(
            under_rules(functools.partial(eval_step, graphdef=graphdef)),
            in_shardings=(param_sh, eval_batch_sh),
            out_shardings=(replicated, replicated),
        ),
        batch_shardings=batch_sh,
        eval_batch_shardings=eval_batch_sh,
        token_order=sequence_lib.token_order(cfg.model.seq_len, sequence),
        pipeline=schedule,
    )

