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

import jax
import jax.numpy as jnp
from flax import nnx

from llmx.config import ModelConfig
from llmx.mesh import constrain

# Parameters are placed on devices by jit out_shardings derived from their logical axes (llmx.mesh),
# not eagerly at creation, so building a model never needs a mesh.
nnx.use_eager_sharding(False)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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


def attention_mask(q_segments, kv_segments, *, q_offset=0):
    """True where query t may attend key s: same document and not in its future. (B, T, S).

    `q_offset` is the index of the first query within the keys (non-zero when decoding with a cache).
    """
    T, S = q_segments.shape[1], kv_segments.shape[1]
    same_doc = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = jnp.arange(S)[None, :] <= (jnp.arange(T) + q_offset)[:, None]  # (T, S)
    return same_doc & causal[None]


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

    def __call__(self, x, segment_ids, positions):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        B, T, _ = x.shape
        K, G = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt), preferred_element_type=jnp.float32)
        k = jnp.einsum("btd,dnk->btnk", x, self.wk[...].astype(dt), preferred_element_type=jnp.float32)
        v = jnp.einsum("btd,dnk->btnk", x, self.wv[...].astype(dt), preferred_element_type=jnp.float32)
        q = rope(q, positions, theta=cfg.rope_theta).astype(dt)  # (B, T, H, Dh)
        k = rope(k, positions, theta=cfg.rope_theta).astype(dt)  # (B, S, K, Dh)
        v = v.astype(dt)
        q = q.reshape(B, T, K, G, cfg.head_dim) * (cfg.head_dim**-0.5)  # (B, T, K, G, Dh)
        scores = jnp.einsum("btngk,bsnk->bngts", q, k, preferred_element_type=jnp.float32)  # (B, K, G, T, S)
        mask = attention_mask(segment_ids, segment_ids)  # (B, T, S)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bngts,bsnk->btngk", probs, v, preferred_element_type=jnp.float32)
        out = out.reshape(B, T, cfg.n_heads, cfg.head_dim).astype(dt)  # (B, T, H, Dh)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)


class MLP(nnx.Module):
    """SwiGLU (Shazeer 2020): down(silu(x W_gate) * x W_up)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), std=cfg.init_std, dtype=pd)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), std=out_std, dtype=pd)

    def __call__(self, x):
        dt = self.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dt), preferred_element_type=jnp.float32)
        up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dt), preferred_element_type=jnp.float32)
        hidden = (jax.nn.silu(gate) * up).astype(dt)  # (B, T, F)
        return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)


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
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
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
        embed = self.embed[...]
        # Gather the whole table for the lookup (what ZeRO-3 does for every weight before use); a
        # lookup into a vocab- and embed-split table would make the partitioner replicate it anyway.
        x = jnp.take(constrain(embed, (None, None)), tokens, axis=0).astype(cfg.dtype)  # (B, T, D)
        x = constrain(x, ("batch", "seq", "embed"))
        x = self._run_blocks(x, segment_ids, positions)
        x = self.final_norm(x)
        unembed = embed.T if cfg.tie_embeddings else self.unembed[...]  # (D, V)
        logits = jnp.einsum("btd,dv->btv", x, unembed.astype(cfg.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))
