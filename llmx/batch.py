"""Batch geometry: how a step's global batch is shaped, split over the mesh and put together from the
rows each process builds.

A training step takes (A, B, T) arrays: A = `train.grad_accum_steps` micro-batches of B global rows of
T = `model.seq_len` tokens, B = `train.micro_batch_size` x the data-parallel size (the product of the
batch axes of `llmx.axes`). Evaluation takes (B, T). Rows are split over the batch axes and tokens over
the `seq` rule's axis (sequence parallelism), in the token order the step asks for (`token_order`: the
load-balanced order of `llmx.sequence`); processes hold contiguous blocks of rows (the device order of
`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmx import axes
from llmx.config import Config
from llmx.mesh import RULES
from llmx.errors import ConfigError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
DTYPES = {"loss_mask": jnp.bool_}  # every other key is int32


def data_parallel_size(mesh: Mesh) -> int:
    return axes.data_parallel_size(dict(mesh.shape))


def micro_rows(cfg: Config, mesh: Mesh) -> int:
    """Global sequences per micro-step, after checking DeepSpeed's arithmetic:
    global batch = micro_batch_size x grad_accum_steps x data-parallel size."""
    t = cfg.train
    dp = data_parallel_size(mesh)
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp
    if t.global_batch_size and t.global_batch_size != global_batch:
        # data and fsdp always, the other batch axes (expert) where they split the batch
        split = " x ".join(f"mesh.{name} {mesh.shape[name]}" for name in axes.BATCH_AXES
                           if name in ("data", "fsdp") or mesh.shape[name] > 1)
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but micro_batch_size {t.micro_batch_size} x "
            f"grad_accum_steps {t.grad_accum_steps} x data-parallel {dp} ({split}) = {global_batch}"
        )
    rows = t.micro_batch_size * dp
    if rows % jax.process_count():
        raise ConfigError(
            f"{rows} sequences per micro-step cannot be split over {jax.process_count()} processes; "
            "raise train.micro_batch_size"
        )
    return rows


def tokens_per_step(cfg: Config, mesh: Mesh) -> int:
    """Tokens of one optimizer step's global batch (padding included)."""
    return cfg.train.grad_accum_steps * cfg.train.micro_batch_size * data_parallel_size(mesh) * cfg.model.seq_len


def sharding(mesh: Mesh, ndim: int, *, batch_dim: int = 0) -> NamedSharding:
    """Rows (dimension `batch_dim`) split over the batch axes, tokens (the next dimension) by the `seq` rule."""
    spec = [None] * ndim
    spec[batch_dim] = axes.BATCH_AXES
    spec[batch_dim + 1] = RULES["seq"]
    return NamedSharding(mesh, P(*spec))


def train_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings of a training batch's (A, B, T) arrays."""
    return {key: sharding(mesh, 3, batch_dim=1) for key in BATCH_KEYS}


def eval_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings of an evaluation batch's (B, T) arrays."""
    return {key: sharding(mesh, 2) for key in BATCH_KEYS}


def to_global(local: dict[str, np.ndarray], shardings: dict, leading: tuple[int, ...], *,
              token_order: np.ndarray | None = None) -> dict:
    """This process's rows -> global arrays laid out by `shardings` (rows over the batch axes), their
    tokens permuted by `token_order` (T,) when given."""
    out = {}
    for key, value in local.items():
        value = value.reshape(*leading, -1, value.shape[-1])  # (..., B_local, T)
        if token_order is not None:
            value = value[..., token_order]
        global_shape = (*leading, value.shape[-2] * jax.process_count(), value.shape[-1])
        out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
    return out


def abstract_batch(cfg: Config, mesh: Mesh) -> dict:
    """ShapeDtypeStructs of one step's global batch (A, B, T), for ahead-of-time lowering."""
    shape = (cfg.train.grad_accum_steps, cfg.train.micro_batch_size * data_parallel_size(mesh), cfg.model.seq_len)
    shardings = train_shardings(mesh)
    return {k: jax.ShapeDtypeStruct(shape, DTYPES.get(k, jnp.int32), sharding=shardings[k]) for k in BATCH_KEYS}
