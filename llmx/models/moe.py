"""A mixture-of-experts SwiGLU layer (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Mixtral, Jiang et
al. 2024): a router picks k of E experts per token, the token's output is the renormalised-weight sum of
those experts' SwiGLU outputs.

Three ways to run the experts, chosen by `model.moe_impl` when the model is built (`EXPERT_IMPLS`):
  - `dense`: capacity-based dispatch and combine (GShard §2.2): every expert gets C token slots, a token
    past its expert's C slots is dropped (its residual passes through); -1 capacity factor: C = all tokens.
    Dispatch and combine are gathers of token rows (GShard's one-hot einsums, same numbers, cost more).
  - `ragged`: the (token, expert) assignments sorted by expert, one `jax.lax.ragged_dot` per projection.
  - `megablox`: the same with the Pallas grouped matmul of `jax.experimental.pallas.ops.tpu.megablox`
    (MaxText's and the JAX team's TPU kernel; interpreted on other platforms).

On a mesh the experts run inside a `shard_map` over all mesh axes: the tokens are split over the batch axes,
the experts (E) over `expert`, each expert's hidden width (F) over `tensor` (partial sums, one psum). With
mesh.expert > 1, tokens reach their experts' devices by `all_to_all` (dense: the dispatched (E, C, D) slots
go out and come back, DeepSpeed-MoE and GShard's exchange); dropless (ragged, megablox) sends each device
exactly its experts' rows with `ragged_all_to_all` on TPU/GPU, and on CPU, where XLA does not implement
that, all-gathers the assignments over `expert`, runs the local experts on theirs and reduce-scatters the
sums back (`dropless_exchange`).

Shapes: N tokens, D d_model, E experts, El experts on this device, k experts per token, C capacity, F expert
hidden width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmx import axes
from llmx.config import ModelConfig
from llmx.errors import ConfigError
from llmx.mesh import active_mesh, traced_platform
from llmx.models.layers import normal_param


def route(x, router, *, k: int):
    """Router of Mixtral (HF `MixtralTopKRouter`): logits (N, E) fp32, softmax, top-k, the k weights
    renormalised to sum to 1. -> (logits (N, E), probs (N, E), top_weights (N, k), top_experts (N, k))."""
    logits = jnp.einsum("nd,de->ne", x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_weights, top_experts = jax.lax.top_k(probs, k)
    return logits, probs, top_weights / top_weights.sum(-1, keepdims=True), top_experts


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
    """Token slots per expert for a block of `n_tokens` (GShard: factor x N x k / E); dropless (-1):
    N, as many as can pick one expert (top-k picks k distinct experts)."""
    if cfg.moe_capacity_factor == -1:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(cfg.moe_capacity_factor * n_tokens * cfg.experts_per_token / cfg.n_experts)))


def slots(top_experts, n_experts: int, capacity_: int):
    """Each assignment's slot in its expert's queue and whether it fits: the first choices of all tokens
    queue before the second choices (GShard, Switch), tokens in order. -> (slot (N, k) int, kept (N, k) bool)."""
    n, k = top_experts.shape
    onehot = jax.nn.one_hot(top_experts.T.reshape(-1), n_experts, dtype=jnp.int32)  # (k*N, E), choice-major
    slot = (jnp.cumsum(onehot, axis=0) - 1) * onehot  # (k*N, E)
    slot = slot.sum(-1).reshape(k, n).T  # (N, k)
    return slot, slot < capacity_


def _swiglu(h_gate, h_up, dtype):
    return (jax.nn.silu(h_gate) * h_up).astype(dtype)


# --- the experts on one device's tokens and experts: (x (N, D), top_experts, top_weights (N, k), weights) ->
# (y (N, D) partial over `tensor`, dropped (N, k))


def _dense(x, top_experts, top_weights, w_gate, w_up, w_down, *, cfg: ModelConfig, expert_axis, ep: int):
    """Capacity-based dispatch and combine (GShard §2.2). The one-hot dispatch/combine einsums (N, E, C) x
    (N, D) cost N·E·C·D, more than the experts themselves at these widths; the same dispatch as a gather of
    token rows into (E, C) slots, and the combine as a gather back, costs (E·C + N·k)·D."""
    N, D = x.shape
    E, dt, El = cfg.n_experts, x.dtype, w_gate.shape[0]
    C = capacity(N, cfg)
    slot, kept = slots(top_experts, E, C)
    dest = jnp.where(kept, top_experts * C + slot, E * C)  # (N, k) flat slot; E*C: dropped
    token = jnp.broadcast_to(jnp.arange(N)[:, None], dest.shape)
    slot_token = jnp.full((E * C + 1,), N, jnp.int32).at[dest.reshape(-1)].set(token.reshape(-1))[:-1]  # (E*C,)
    xin = jnp.concatenate([x, jnp.zeros((1, D), dt)])[slot_token].reshape(E, C, D)  # empty slots: zero rows
    if expert_axis is not None:  # slots of expert e go to its device; back come the other devices' tokens
        xin = jax.lax.all_to_all(xin, expert_axis, 0, 0, tiled=True)  # (E, C, D): [source, local expert]
    xin = xin.reshape(ep, El, C, D)  # (S, El, C, D)
    h = _swiglu(jnp.einsum("secd,edf->secf", xin, w_gate, preferred_element_type=jnp.float32),
                jnp.einsum("secd,edf->secf", xin, w_up, preferred_element_type=jnp.float32), dt)
    out = jnp.einsum("secf,efd->secd", h, w_down, preferred_element_type=jnp.float32).astype(dt)
    out = out.reshape(ep * El, C, D)
    if expert_axis is not None:
        out = jax.lax.all_to_all(out, expert_axis, 0, 0, tiled=True)  # (E, C, D) by global expert again
    out = jnp.concatenate([out.reshape(E * C, D), jnp.zeros((1, D), dt)])  # (E*C + 1, D)
    weights = jnp.where(kept, top_weights, 0.0).astype(jnp.float32)
    y = jnp.einsum("nkd,nk->nd", out[dest], weights, preferred_element_type=jnp.float32)  # (N, D)
    return y, ~kept


def _ragged_dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def _megablox_dot(lhs, rhs, group_sizes):
    from jax.experimental.pallas.ops.tpu import megablox

    m, d, f = lhs.shape[0], lhs.shape[1], rhs.shape[2]
    tm = 128 if m >= 128 else -(-m // 8) * 8
    rows = -(-m // tm) * tm  # the kernel tiles the rows: pad them
    # The kernel leaves rows past the last group unwritten, forward and in its backward gmm: zero them on
    # both sides (a `where` passes no cotangent to the rows it does not select).
    valid = (jnp.arange(rows) < group_sizes.sum())[:, None]
    lhs = jnp.where(valid, jnp.pad(lhs, ((0, rows - m), (0, 0))), 0)
    out = megablox.gmm(lhs, rhs, group_sizes.astype(jnp.int32), jnp.float32, (tm, min(128, d), min(128, f)),
                       interpret=traced_platform() != "tpu")
    return jnp.where(valid, out, 0.0)[:m]


def _ffn_by_group(rows, group, w_gate, w_up, w_down, *, dot):
    """The experts' SwiGLU on rows (M, D) of expert `group` (M,) in [0, El] (El: none of this device's),
    by grouped matmuls over the rows sorted by group. -> (M, D) fp32 in the rows' order, zero for El."""
    El, dt = w_gate.shape[0], rows.dtype
    order = jnp.argsort(group, stable=True)
    xs = rows[order]
    group_sizes = jnp.bincount(group, length=El + 1)[:El]  # (El,); the El rows sort past the last group
    h = _swiglu(dot(xs, w_gate, group_sizes), dot(xs, w_up, group_sizes), dt)  # (M, F)
    out = jnp.where((group[order] < El)[:, None], dot(h, w_down, group_sizes), 0.0)  # (M, D)
    return jnp.zeros_like(out).at[order].set(out)


def _grouped(x, top_experts, top_weights, w_gate, w_up, w_down, *, cfg: ModelConfig, expert_axis, ep: int, dot):
    """Dropless (or capacity-limited) experts by grouped matmuls over the assignments sorted by expert."""
    N, D = x.shape
    k, El = cfg.experts_per_token, w_gate.shape[0]
    _, kept = slots(top_experts, cfg.n_experts, capacity(N, cfg))
    weights = jnp.where(kept, top_weights, 0.0).astype(jnp.float32)  # (N, k)
    rows = jnp.repeat(x, k, axis=0)  # (N*k, D): row n*k + j is token n's j-th choice
    group = jnp.where(kept, top_experts, cfg.n_experts).reshape(-1)  # (N*k,), n_experts: dropped
    if expert_axis is None:
        out = _ffn_by_group(rows, group, w_gate, w_up, w_down, dot=dot)
    elif dropless_exchange(traced_platform()) == "all_gather":
        out = _exchange_by_gather(rows, group, w_gate, w_up, w_down, axis=expert_axis, dot=dot)
    else:
        out = _exchange_ragged(rows, group, w_gate, w_up, w_down, axis=expert_axis, ep=ep, dot=dot)
    y = jnp.einsum("nkd,nk->nd", out.reshape(N, k, D), weights)
    return y, ~kept


def dropless_exchange(platform: str) -> str:
    """How assignments reach their experts' devices without a capacity: `ragged_all_to_all` (only the
    routed rows travel), or on CPU, where XLA does not implement it, `all_gather` and reduce-scatter."""
    return "all_gather" if platform == "cpu" else "ragged_all_to_all"


def _exchange_by_gather(rows, group, w_gate, w_up, w_down, *, axis, dot):
    """Every device's assignments gathered, this device's experts run on theirs, the sums reduce-scattered."""
    El = w_gate.shape[0]
    all_rows = jax.lax.all_gather(rows, axis, tiled=True)  # (ep*M, D)
    local = jax.lax.all_gather(group, axis, tiled=True) - jax.lax.axis_index(axis) * El
    local = jnp.where((local >= 0) & (local < El), local, El)
    out = _ffn_by_group(all_rows, local, w_gate, w_up, w_down, dot=dot)  # zero where another device's
    return jax.lax.psum_scatter(out, axis, scatter_dimension=0, tiled=True)  # (M, D)


def _exchange_ragged(rows, group, w_gate, w_up, w_down, *, axis, ep: int, dot):
    """Assignments sorted by expert travel to their experts' devices and back by `ragged_all_to_all`
    (MaxText's dropless expert parallelism); the receive buffer holds the worst case, ep x M rows."""
    M, D = rows.shape
    El, E, dt = w_gate.shape[0], w_gate.shape[0] * ep, rows.dtype
    me = jax.lax.axis_index(axis)
    order = jnp.argsort(group, stable=True)  # by global expert; dropped (E) last
    counts = jnp.bincount(group, length=E + 1)[:E]  # (E,)
    send = counts.reshape(ep, El).sum(1)  # (ep,) rows for each device
    send_offsets = jnp.cumsum(send) - send
    table = jax.lax.all_gather(counts, axis).reshape(ep, ep, El)  # [source, device, local expert] rows
    recv = table[:, me].sum(-1)  # (ep,) rows from each source
    recv_offsets = jnp.cumsum(recv) - recv
    before_me = (jnp.arange(ep) < me)[:, None]  # (ep, 1) sources before this one
    land = (table.sum(-1) * before_me).sum(0)  # (ep,) where this device's slice lands on device j
    received = ragged_all_to_all(rows[order], jnp.zeros((ep * M, D), dt), send_offsets, send, land, recv, axis_name=axis)
    # Received rows run source by source, each source's by local expert.
    sizes = table[:, me].reshape(-1)  # (ep*El,) in (source, expert) order
    expert_of_row = jnp.repeat(jnp.tile(jnp.arange(El), ep), sizes, total_repeat_length=ep * M)
    expert_of_row = jnp.where(jnp.arange(ep * M) < recv.sum(), expert_of_row, El)
    out = _ffn_by_group(received, expert_of_row, w_gate, w_up, w_down, dot=dot).astype(dt)
    # Back where they came from: to source j, at the offset its own slice for this device started.
    back_land = (table.sum(-1) * (jnp.arange(ep) < me)[None, :]).sum(1)  # (ep,)
    back = ragged_all_to_all(out, jnp.zeros((M, D), dt), recv_offsets, recv, back_land, send, axis_name=axis)
    return jnp.zeros((M, D), dt).at[order].set(back).astype(jnp.float32)  # (M, D) in the rows' order


ragged_all_to_all = jax.lax.ragged_all_to_all  # a seam: tests on CPU put an all-gather emulation here


EXPERT_IMPLS = {
    "dense": _dense,
    "ragged": functools.partial(_grouped, dot=_ragged_dot),
    "megablox": functools.partial(_grouped, dot=_megablox_dot),
}


def resolve_impl(cfg: ModelConfig, platform: str) -> str:
    """model.moe_impl with `auto` resolved: capacity-limited -> dense, TPU -> megablox, else ragged."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if cfg.moe_capacity_factor != -1:
        return "dense"
    return "megablox" if platform == "tpu" else "ragged"


def run_experts(x, top_experts, top_weights, w_gate, w_up, w_down, *, cfg: ModelConfig):
    """y (N, D) fp32 and dropped (N, k) bool for tokens x (N, D) routed to `top_experts` with `top_weights`;
    on the active mesh, one `shard_map` over all its axes (module docstring)."""
    impl = resolve_impl(cfg, traced_platform())
    fn = EXPERT_IMPLS[impl]
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return fn(x, top_experts, top_weights, w_gate, w_up, w_down, cfg=cfg, expert_axis=None, ep=1)
    ep = mesh.shape["expert"]
    if cfg.n_experts % ep:
        raise ConfigError(f"model.n_experts={cfg.n_experts} is not divisible by mesh.expert={ep}; "
                          f"use a divisor of {cfg.n_experts}")
    token_axes = tuple(a for a in axes.BATCH_AXES if mesh.shape[a] > 1)
    split = math.prod(mesh.shape[a] for a in token_axes)
    n = x.shape[0]
    pad = -n % split  # a decode step's few tokens: pad to one row per device at least
    if pad:
        x, top_experts, top_weights = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, top_experts, top_weights))
    # megablox's kernel cannot be split by the partitioner nor typed by shard_map: the hidden width stays
    # whole there (gathered over tensor), so no psum is needed.
    tensor = "tensor" if impl != "megablox" and cfg.expert_d_ff % mesh.shape["tensor"] == 0 and mesh.shape["tensor"] > 1 else None
    expert = "expert" if ep > 1 else None
    tokens = P(token_axes or None)
    w_in, w_out = P(expert, None, tensor), P(expert, tensor, None)

    def local(x, top_experts, top_weights, w_gate, w_up, w_down):
        y, dropped = fn(x, top_experts, top_weights, w_gate, w_up, w_down, cfg=cfg, expert_axis=expert, ep=ep)
        if tensor is not None:
            y = jax.lax.psum(y, tensor)  # each tensor shard summed its slice of F
        return y, dropped

    y, dropped = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out), out_specs=(tokens, tokens),
        check_vma=impl != "megablox",
    )(x, top_experts, top_weights, w_gate, w_up, w_down)
    return y[:n], dropped[:n]


class MoE(nnx.Module):
    """Router (D, E) and E SwiGLU experts stacked on the `experts` logical axis (mesh axis `expert`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.n_experts, cfg.expert_d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.router = normal_param(rngs, (D, E), ("embed", None), std=cfg.init_std, dtype=pd)
        self.w_gate = normal_param(rngs, (E, D, F), ("experts", "embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.w_up = normal_param(rngs, (E, D, F), ("experts", "embed", "mlp"), std=cfg.init_std, dtype=pd)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_down = normal_param(rngs, (E, F, D), ("experts", "mlp", "embed"), std=out_std, dtype=pd)

    def __call__(self, x):
        """(y (B, T, D), stats): stats are this layer's sums for the auxiliary losses and metrics
        (`auxiliary`): per-expert assignment counts and router probabilities, the z-loss sum, drops."""
        cfg = self.cfg
        B, T, D = x.shape
        dt = x.dtype
        tokens = x.reshape(B * T, D)  # (N, D)
        logits, probs, top_weights, top_experts = route(tokens, self.router[...], k=cfg.experts_per_token)
        w = [getattr(self, name)[...].astype(dt) for name in ("w_gate", "w_up", "w_down")]
        y, dropped = run_experts(tokens, top_experts, top_weights.astype(dt), *w, cfg=cfg)
        stats = {
            "counts": jax.nn.one_hot(top_experts, cfg.n_experts, dtype=jnp.float32).sum((0, 1)),  # (E,)
            "probs": probs.sum(0),  # (E,)
            "z": jnp.square(jax.nn.logsumexp(logits, axis=-1)).sum(),  # ST-MoE z-loss (Zoph et al. 2022, eq. 5)
            "dropped": dropped.astype(jnp.float32).sum(),
            "tokens": jnp.float32(B * T),
        }
        return y.astype(dt).reshape(B, T, D), stats


def load_balancing_loss(counts, probs, n_tokens, n_experts: int):
    """Switch (Fedus et al. 2021, eq. 4) as Mixtral computes it over all layers' tokens together
    (transformers' `load_balancing_loss_func`): E x sum_e (assignments to e / tokens) x mean router prob of e.
    counts, probs: (L, E) per-layer sums; n_tokens: (L,)."""
    total = n_tokens.sum()
    return n_experts * jnp.sum(counts.sum(0) / total * (probs.sum(0) / total))


def auxiliary(stats: dict, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """(the penalty added to the mean loss, metrics) from the layers' stacked (L, ...) stats."""
    aux = load_balancing_loss(stats["counts"], stats["probs"], stats["tokens"], cfg.n_experts)
    z = stats["z"].sum() / stats["tokens"].sum()
    per_layer_load = stats["counts"]  # (L, E) assignments per expert
    metrics = {
        "aux_loss": aux,
        "z_loss": z,
        "dropped_fraction": stats["dropped"].sum() / (stats["tokens"].sum() * cfg.experts_per_token),
        "expert_load_max": per_layer_load.max(-1).mean(),  # tokens of the busiest expert, mean over layers
        "expert_load_mean": per_layer_load.mean(-1).mean(),
    }
    return cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z, metrics
