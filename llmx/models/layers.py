"""The layers model families share, in Flax NNX: RMSNorm, rotary embeddings, grouped-query attention
(with its KV-cache decode), the SwiGLU MLP, and the runner of a stack of layers (scan or unrolled, with
activation checkpointing) with its seam for another schedule (`run_stack`: the pipeline's).

Every parameter names its logical axes (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`);
`llmx.mesh` maps them to mesh axes, so this file knows nothing about devices.
Shapes: B batch, T query positions, S key positions, D d_model, H heads, K kv heads, G = H / K,
Dh head_dim, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx import attention as attention_lib
from llmx.attention import attention_mask, masked_attention
from llmx.config import ModelConfig
from llmx.mesh import active_mesh, traced_platform
from llmx.matmul import DOT, PROJECTION
from llmx.models import lora

# Parameters are placed on devices by jit out_shardings derived from their logical axes (llmx.mesh),
# not eagerly at creation, so building a model never needs a mesh.
nnx.use_eager_sharding(False)

# model.remat -> the policy applied to each layer, by the names llmx.matmul.einsum gives every matmul's
# output (jax's dots_saveable policies would miss the bf16 matmuls, which sit inside custom VJPs).
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": lambda platform: _policies.nothing_saveable,
    "dots_saveable": lambda platform: _policies.save_only_these_names(DOT, PROJECTION),
    "dots_with_no_batch_dims_saveable": lambda platform: _policies.save_only_these_names(PROJECTION),
    # The projections' outputs go to host memory between the forward and backward pass; on CPU device
    # memory is host memory, so they stay where they are.
    "offload": lambda platform: _policies.save_only_these_names(PROJECTION) if platform == "cpu"
    else _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[PROJECTION],
        offload_src="device", offload_dst="pinned_host",
    ),
}


def normal_param(rngs: nnx.Rngs, shape, axes, *, std: float, dtype) -> nnx.Param:
    """A parameter of `shape` drawn from N(0, std²), annotated with its logical `axes`."""
    init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
    return nnx.Param(init(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

    def __call__(self, x):
        # Statistics in fp32 whatever the compute dtype (Llama's reference does the same).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, *, theta: float, max_position: int | None = None):
    """Rotary embedding (Su et al. 2021) in the rotate-half layout of HF Llama. x: (B, T, N, Dh).

    `max_position`: positions are known to be below it (training and evaluation: model.seq_len; a position
    past the table reads NaN, not a wrong angle). On CPU cos and sin are then looked up in a table
    computed while tracing: XLA:CPU fuses the transcendentals into every elementwise consumer and
    recomputes them per element of the (B, T, N, Dh) tensors (bench model, Zen 4: bf16 step 1.10x faster
    with the table, fp32 unchanged). The lookup clamps positions into the table, whose last row is NaN:
    `take`'s default fill mode put its bounds test and NaN select into every consumer fusion, per element
    of the (B, T, N, Dh) tensors (bf16 bench step: 50 of 97 compares and 16 of 17 NaN constants gone;
    in-process A/Bs on a Zen 4 read 0.995-1.051x in bf16 and 0.991-1.074x in fp32, noise included).
    Other platforms compute them in place."""
    half = x.shape[-1] // 2
    if max_position is not None and traced_platform() == "cpu":
        cos_table, sin_table = _rope_tables(max(max_position, positions.shape[1]), half, theta)
        cos = jnp.take(cos_table, positions, axis=0, mode="clip")[:, :, None, :]  # (B, T, 1, Dh/2)
        sin = jnp.take(sin_table, positions, axis=0, mode="clip")[:, :, None, :]
    else:
        freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (Dh/2,)
        angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, Dh/2)
        cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, Dh/2)
        sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@functools.lru_cache(maxsize=16)
def _rope_tables(n: int, half: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position x frequency for positions [0, n), as `rope` computes them, and a NaN row
    for every position past them (a clamped lookup reads it): (n + 1, Dh/2) fp32."""
    freqs = (np.float32(theta) ** (-np.arange(half, dtype=np.float32) / np.float32(half))).astype(np.float32)
    angles = np.concatenate([np.arange(n, dtype=np.float32)[:, None] * freqs, np.full((1, half), np.nan, np.float32)])
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def compute_dtype(cfg: ModelConfig):
    """The dtype of activations and matmul operands (a config built without `llmx.config.load`
    may still say 'auto': fp32)."""
    return jnp.dtype("float32" if cfg.dtype == "auto" else cfg.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding: k, v (L, B, S, K, Dh), preallocated to S slots, and
    the segment id of each filled slot (B, S) (0: padding or not yet written)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.wq = normal_param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=pd)
        self.wk = normal_param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=pd)
        self.wv = normal_param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=pd)
        # Residual projections scaled by 1/sqrt(2L) (GPT-2) so the stream's variance stays flat in depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wo = normal_param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
        lora.attach(self, cfg, rngs, {"wq": 1, "wk": 1, "wv": 1, "wo": 2})  # model.lora_targets

    def _qkv(self, x, positions, max_position=None):
        """Rotated queries (B, T, H, Dh) and keys, values (B, T, K, Dh) in the compute dtype."""
        cfg = self.cfg
        dt = x.dtype
        q = lora.project(self, "wq", "btd,dhk->bthk", x)  # fp32 accumulation
        k = lora.project(self, "wk", "btd,dnk->btnk", x)
        v = lora.project(self, "wv", "btd,dnk->btnk", x)
        q = rope(q, positions, theta=cfg.rope_theta, max_position=max_position).astype(dt)  # (B, T, H, Dh)
        k = rope(k, positions, theta=cfg.rope_theta, max_position=max_position).astype(dt)  # (B, S, K, Dh)
        return q, k, v.astype(dt)

    def __call__(self, x, segment_ids, positions):
        q, k, v = self._qkv(x, positions, self.cfg.seq_len)  # training/eval positions are below seq_len
        # The kernel is looked up while tracing (model.attention, and mesh.sequence_strategy when the
        # sequence is split: llmx.attention.kernel); positions give split, reordered tokens their mask.
        attend = attention_lib.kernel(self.cfg.attention, x.dtype)
        return self._project(attend(q, k, v, segment_ids, positions))

    def decode(self, x, k_cache, v_cache, *, kv_segments, segment_ids, positions, index):
        """Attention of T new tokens at cache slots [index, index + T) over the cache (B, S, K, Dh);
        returns the output (B, T, D) and the cache with the new keys and values written in."""
        q, k, v = self._qkv(x, positions)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        mask = attention_mask(segment_ids, kv_segments, q_offset=index)  # (B, T, S)
        out = masked_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        return self._project(out), k_cache, v_cache

    def _project(self, out):
        """Heads (B, T, H, Dh) -> the residual stream (B, T, D)."""
        return lora.project(self, "wo", "bthk,hkd->btd", out).astype(out.dtype)


class MLP(nnx.Module):
    """SwiGLU (Shazeer 2020): down(silu(x W_gate) * x W_up)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.w_gate = normal_param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.w_up = normal_param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_down = normal_param(rngs, (F, D), ("mlp", "embed"), std=out_std, dtype=pd)
        lora.attach(self, cfg, rngs, {"w_gate": 1, "w_up": 1, "w_down": 1})  # model.lora_targets

    def __call__(self, x):
        dt = x.dtype
        # Both projections rounded to the compute dtype, as every other projection output here (and PyTorch
        # autocast's Linear), the SiLU and the product taken in fp32: in bf16 XLA then keeps the backward's
        # (B, T, F) inputs as bf16 rather than the fp32 dot outputs. Bench model, bf16, Zen 4, in-process A/B:
        # compiled temporaries 177 -> 154 MiB, step 1.011-1.019x (test_model checks the memory). fp32 unchanged.
        gate = lora.project(self, "w_gate", "btd,df->btf", x).astype(dt).astype(jnp.float32)  # (B, T, F)
        up = lora.project(self, "w_up", "btd,df->btf", x).astype(dt).astype(jnp.float32)
        hidden = (jax.nn.silu(gate) * up).astype(dt)  # (B, T, F)
        return lora.project(self, "w_down", "btf,fd->btd", hidden).astype(x.dtype)


# model.scan_layers=auto on one CPU device: unrolled up to this depth. XLA:CPU runs the unrolled stack of
# the bench model ~1.2x faster in fp32 and bf16 (AMD EPYC Zen 4, scripts/bench_vs_torch.py): under lax.scan
# every residual the backward pass needs is written into a stacked (L, ...) buffer (broadcast to zeros
# first, then a dynamic-update-slice per layer) and read back by a dynamic slice. Compile time grows with
# depth (16 layers of the bench model: 13 s against 5 s), hence the bound. auto keeps the scan where the
# loop is what the layout relies on: with activation checkpointing (unrolled, XLA's scheduler undid every
# policy: test_model's remat config kept 117 MiB of temporaries under each, against 124 -> 36 MiB scanned)
# and on a mesh of several devices (ZeRO-3 gathers one layer's weights per loop iteration). Accelerators
# keep the scan.
UNROLL_ON_CPU_MAX_LAYERS = 16


def scans(scan_layers: str | bool, n_layers: int, platform: str | None = None, remat: str = "none",
          devices: int | None = None) -> bool:
    """Whether `model.scan_layers` runs the stack under lax.scan on `platform` with `devices` devices (None:
    the mesh being traced for, `llmx.mesh.active_mesh`) and activation checkpointing `remat`."""
    if isinstance(scan_layers, bool) or scan_layers != "auto":
        return scan_layers in (True, "true")
    if devices is None:
        mesh = active_mesh()
        devices = 1 if mesh is None else mesh.devices.size
    one_cpu = (platform or traced_platform()) == "cpu" and devices == 1
    return not (one_cpu and remat == "none" and n_layers <= UNROLL_ON_CPU_MAX_LAYERS)


def run_layers(
    blocks: nnx.Module, layer_fn: Callable, carry, xs: Any = None, *, scan: str | bool, remat: str = "none",
    prepare: Callable = lambda layer_state: layer_state,
) -> tuple[Any, Any]:
    """Runs `layer_fn(block, carry, x) -> (carry, y)` over the layers of `blocks`, a module whose every
    Param has a leading (L,) axis (built under `nnx.vmap`), with x the layer's slice of `xs` (a pytree
    with a leading (L,) axis, or None); returns (carry, ys stacked to (L, ...)), like `lax.scan`.
    `scan`: one traced layer under `lax.scan`, so compile time does not grow with depth, or L unrolled
    copies (model.scan_layers: True/"true", False/"false", or "auto": `scans`). `remat`: the
    activation-checkpointing policy of each layer (model.remat, REMAT_POLICIES).
    `prepare` maps a layer's weights before use (a pipeline stage gathers its ZeRO-3 shards there)."""
    graphdef, stacked = nnx.split(blocks)
    scan = scans(scan, jax.tree.leaves(stacked)[0].shape[0], remat=remat)

    def layer(carry, inputs):
        layer_state, x = inputs
        return layer_fn(nnx.merge(graphdef, prepare(layer_state)), carry, x)

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat](traced_platform()), prevent_cse=not scan)
    if scan:
        return jax.lax.scan(layer, carry, (stacked, xs))
    leaves, treedef = jax.tree.flatten((stacked, xs))
    slices = [unstack(leaf) for leaf in leaves]
    ys = []
    for i in range(leaves[0].shape[0]):
        carry, y = layer(carry, jax.tree.unflatten(treedef, [parts[i] for parts in slices]))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """x (L, ...) -> its L slices, whose gradient is one stack of theirs. Slicing layer i out of a
    stacked weight differentiates to a pad of its gradient into zeros of the whole (L, ...) shape, and
    the L pads are summed: L times the writes, plus L - 1 full-size adds (2-3 % of the bench model's
    unrolled bf16 step on XLA:CPU, Zen 4)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return tuple(x[i] for i in range(x.shape[0]))
    return _unstack(x)


@jax.custom_vjp
def _unstack(x):
    return tuple(x[i] for i in range(x.shape[0]))


_unstack.defvjp(lambda x: (_unstack(x), None), lambda _, grads: (jnp.stack(grads),))


def _sequential(blocks: nnx.Module, layer_fn: Callable, carry, *, scan: str | bool, remat: str):
    return run_layers(blocks, layer_fn, carry, scan=scan, remat=remat)[0]


# How a forward pass runs its layer stack: one layer after another on every device, unless a step was
# built for a pipelined mesh and installed the pipeline's schedule (`llmx.pipeline`) for its tracing.
_STACK_RUNNER: contextvars.ContextVar[Callable] = contextvars.ContextVar("llmx_stack_runner", default=_sequential)


@contextlib.contextmanager
def stack_runner(runner: Callable):
    """While tracing under this context, `run_stack` runs the layer stack with `runner(blocks, layer_fn,
    carry, *, scan, remat) -> carry` (the step builder picks it for the mesh, `llmx.step`)."""
    token = _STACK_RUNNER.set(runner)
    try:
        yield
    finally:
        _STACK_RUNNER.reset(token)


def run_stack(blocks: nnx.Module, layer_fn: Callable, carry, *, scan: str | bool, remat: str = "none"):
    """A forward pass's layer stack: `layer_fn(block, carry, None) -> (carry, None)` over every layer of
    `blocks`; returns the last carry. `carry` is a pytree of arrays with a leading row axis: the
    activations and every per-row value the layers read (segment ids, positions), so a schedule that
    splits the rows into micro-batches and runs them on different stages at once (the pipeline) hands
    each layer the values of its rows. Runs `run_layers` unless a step installed another schedule
    (`stack_runner`); decoding with a KV cache calls `run_layers` itself."""
    return _STACK_RUNNER.get()(blocks, layer_fn, carry, scan=scan, remat=remat)
