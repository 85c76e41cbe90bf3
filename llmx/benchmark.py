"""Timing the real train step on synthetic batches, for the scripts in `scripts/`.

Step times are medians of individually synchronised steps after warmup (the first call compiles).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmx import mesh as mesh_lib
from llmx.batch import abstract_batch
from llmx.config import Config
from llmx.plan import state_memory
from llmx.step import build_steps


def synthetic_batch(cfg: Config, mesh, *, seed: int = 0, token_order: np.ndarray | None = None) -> dict:
    """Random tokens, one document per row, every target counted; laid out like a real batch (tokens
    in the step's order: `Steps.token_order`)."""
    shapes = abstract_batch(cfg, mesh)
    shape = shapes["inputs"].shape  # (A, B, T)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.model.vocab_size, (*shape[:-1], shape[-1] + 1), dtype=np.int32)
    host = {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape),
        "loss_mask": np.ones(shape, bool),
    }
    if token_order is not None:
        host = {k: v[..., token_order] for k, v in host.items()}
    return {k: jax.device_put(v, shapes[k].sharding) for k, v in host.items()}


def measure_train_step(cfg: Config, *, devices=None, steps: int = 10, warmup: int = 2) -> dict:
    """Compile time, median step time, tokens/s and per-device memory of `cfg`'s train step."""
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    built = build_steps(cfg, mesh)
    state = built.init()
    batch = synthetic_batch(cfg, mesh, token_order=built.token_order)
    t0 = time.perf_counter()
    compiled = built.train.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens = int(np.prod(batch["inputs"].shape))
    memory = state_memory(cfg, built)
    analysis = compiled.memory_analysis()
    return {
        "mesh": dict(mesh.shape),
        "zero_stage": cfg.mesh.zero_stage,
        "compile_seconds": compile_seconds,
        "step_time": step_time,
        "step_times": times,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / step_time,
        "final_loss": float(jnp.asarray(metrics["loss"])),
        "state_bytes_per_device": memory.total,
        "temp_bytes_per_device": analysis.temp_size_in_bytes,
        "peak_bytes_per_device": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes,
    }
