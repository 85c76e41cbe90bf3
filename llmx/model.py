"""A Llama-family decoder in Flax NNX.

token embedding -> n_layers x [RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU -> residual]
-> RMSNorm -> output projection (untied, or the transposed embedding).

Every parameter names its logical axes (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`);
`llmx.mesh` maps them to mesh axes, so this file knows nothing about devices. Layer parameters are stacked
on a leading `layers` axis and run with `lax.scan`, so compile time does not grow with depth.
Shapes: B batch, T query positions, S key positions, D d_model, H heads, K kv heads, G = H / K,
Dh head_dim, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from llmx import attention as attention_lib
from llmx.attention import attention_mask, masked_attention
from llmx.config import ModelConfig
from llmx.mesh import constrain, traced_platform
from llmx.matmul import DOT, PROJECTION, einsum

__all__ = ["KVCache", "Llama", "attention_mask", "compute_dtype"]

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


def _param(rngs: nnx.Rngs, shape, axes, *, std: float, dtype) -> nnx.Param:
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


def rope(x, positions, *, theta: float):
    """Rotary embedding (Su et al. 2021) in the rotate-half layout of HF Llama. x: (B, T, N, Dh)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (Dh/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, Dh/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, Dh/2)
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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
        self.wq = _param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=pd)
        self.wk = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=pd)
        self.wv = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=pd)
        # Residual projections scaled by 1/sqrt(2L) (GPT-2) so the stream's variance stays flat in depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wo = _param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)

    def _qkv(self, x, positions):
        """Rotated queries (B, T, H, Dh) and keys, values (B, T, K, Dh) in the compute dtype."""
        cfg = self.cfg
        dt = x.dtype
        q = einsum("btd,dhk->bthk", x, self.wq[...])  # fp32 accumulation
        k = einsum("btd,dnk->btnk", x, self.wk[...])
        v = einsum("btd,dnk->btnk", x, self.wv[...])
        q = rope(q, positions, theta=cfg.rope_theta).astype(dt)  # (B, T, H, Dh)
        k = rope(k, positions, theta=cfg.rope_theta).astype(dt)  # (B, S, K, Dh)
        return q, k, v.astype(dt)

    def __call__(self, x, segment_ids, positions):
        q, k, v = self._qkv(x, positions)
        # The kernel is looked up while tracing (model.attention; llmx.attention.ATTENTION).
        attend = attention_lib.ATTENTION[attention_lib.resolve(self.cfg.attention, x.dtype)]
        return self._project(attend(q, k, v, segment_ids))

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
        return einsum("bthk,hkd->btd", out, self.wo[...]).astype(out.dtype)


class MLP(nnx.Module):
    """SwiGLU (Shazeer 2020): down(silu(x W_gate) * x W_up)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), std=out_std, dtype=pd)

    def __call__(self, x):
        gate = einsum("btd,df->btf", x, self.w_gate[...])  # (B, T, F) fp32
        up = einsum("btd,df->btf", x, self.w_up[...])
        hidden = (jax.nn.silu(gate) * up).astype(x.dtype)  # (B, T, F)
        return einsum("btf,fd->btd", hidden, self.w_down[...]).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, segment_ids, positions):
        x = x + self.attn(self.attn_norm(x), segment_ids, positions)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed"))  # block boundary

    def decode(self, x, k_cache, v_cache, *, kv_segments, segment_ids, positions, index):
        """The block on T new tokens with this layer's KV cache; -> (x, k_cache, v_cache)."""
        attn, k_cache, v_cache = self.attn.decode(
            self.attn_norm(x), k_cache, v_cache,
            kv_segments=kv_segments, segment_ids=segment_ids, positions=positions, index=index,
        )
        x = x + attn
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed")), k_cache, v_cache


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every Param has a leading (L,) axis
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=pd)

    def _run_blocks(self, x, segment_ids, positions):
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, segment_ids, positions)

        if cfg.remat != "none":
            policy = REMAT_POLICIES[cfg.remat](traced_platform())
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(lambda carry, s: (layer(carry, s), None), x, stacked)
            return x
        for i in range(cfg.n_layers):
            x = layer(x, jax.tree.map(functools.partial(lambda a, i: a[i], i=i), stacked))
        return x

    def __call__(self, tokens, segment_ids=None, positions=None):
        """Logits (B, T, V) in fp32 for int tokens (B, T); segment ids and positions default to one document."""
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self._run_blocks(self._embed(tokens), segment_ids, positions)
        return self._logits(x)

    def _embed(self, tokens):
        # Gather the whole table for the lookup (what ZeRO-3 does for every weight before use); a
        # lookup into a vocab- and embed-split table would make the partitioner replicate it anyway.
        x = jnp.take(constrain(self.embed[...], (None, None)), tokens, axis=0).astype(compute_dtype(self.cfg))  # (B, T, D)
        return constrain(x, ("batch", "seq", "embed"))

    def _logits(self, x):
        cfg = self.cfg
        x = self.final_norm(x)
        unembed = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]  # (D, V)
        logits = einsum("btd,dv->btv", x, unembed)  # fp32, so softmax and the loss are fp32
        return constrain(logits, ("batch", "seq", "vocab"))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt and generated)."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        kv = jnp.zeros(shape, compute_dtype(cfg))
        return KVCache(k=kv, v=kv, segment_ids=jnp.zeros((batch_size, max_len), jnp.int32))

    def decode(self, tokens, cache: KVCache, *, segment_ids, positions, index):
        """Logits (B, T, V) for T new tokens (B, T) that fill cache slots [index, index + T), and the
        updated cache. Prefill is the call with index 0 and the whole prompt; a decode step is T = 1.
        Slots whose segment id differs from the query's (padding: 0) are never attended to."""
        cfg = self.cfg
        kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, index, axis=1)  # (B, S)
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, xs):
            layer_state, k_cache, v_cache = xs
            x, k_cache, v_cache = nnx.merge(graphdef, layer_state).decode(
                x, k_cache, v_cache, kv_segments=kv_segments, segment_ids=segment_ids, positions=positions, index=index
            )
            return x, (k_cache, v_cache)

        x = self._embed(tokens)
        if cfg.scan_layers:
            x, (k, v) = jax.lax.scan(layer, x, (stacked, cache.k, cache.v))  # k, v: (L, B, S, K, Dh)
        else:
            ks, vs = [], []
            for i in range(cfg.n_layers):
                x, (k_i, v_i) = layer(x, jax.tree.map(functools.partial(lambda a, i: a[i], i=i), (stacked, cache.k, cache.v)))
                ks.append(k_i)
                vs.append(v_i)
            k, v = jnp.stack(ks), jnp.stack(vs)
        cache_axes = ("layers", "batch", "seq", "kv_heads", "head_dim")
        cache = KVCache(k=constrain(k, cache_axes), v=constrain(v, cache_axes), segment_ids=kv_segments)
        return self._logits(x), cache
