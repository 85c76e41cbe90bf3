"""The Llama family: the decoder in Flax NNX, its FLOPs per token, and its Hugging Face name mapping.

token embedding -> n_layers x [RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU -> residual]
-> RMSNorm -> output projection (untied, or the transposed embedding).

Layer parameters are stacked on a leading `layers` axis and run by `layers.run_stack` (`lax.scan` by
default, so compile time does not grow with depth; the pipeline's schedule on a pipelined mesh).
Shapes as in `llmx.models.layers`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.config import ModelConfig
from llmx.errors import ConfigError
from llmx.mesh import constrain
from llmx.models.family import Family, HFMapping, HFTensors
from llmx.models.layers import MLP, Attention, KVCache, RMSNorm, compute_dtype, normal_param, run_layers, run_stack
from llmx.matmul import einsum
from llmx.quantization import mode as quantization_mode
from llmx.quantization import take_rows


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
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, block=Block):
        # `block`: the decoder block's class (a family that changes only the block passes its own)
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every Param has a leading (L,) axis
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed = normal_param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=pd
            )

    def __call__(self, tokens, segment_ids=None, positions=None):
        """Logits (B, T, V) in fp32 for int tokens (B, T); segment ids and positions default to one document."""
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

        def layer(block, carry, _):
            x, segments, pos = carry  # (B, T, D), (B, T), (B, T): a pipeline stage sees its micro-batch's rows
            return (block(x, segments, pos), segments, pos), None

        with quantization_mode(cfg.quantization):  # model.quantization: fake-quantised projections
            x, _, _ = run_stack(
                self.blocks, layer, (self._embed(tokens), segment_ids, positions), scan=cfg.scan_layers,
                remat=cfg.remat,
            )
            return self._logits(x)

    def _embed(self, tokens):
        # Gather the whole table for the lookup (what ZeRO-3 does for every weight before use); a
        # lookup into a vocab- and embed-split table would make the partitioner replicate it anyway.
        x = take_rows(constrain(self.embed[...], (None, None)), tokens).astype(compute_dtype(self.cfg))  # (B, T, D)
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
        kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, index, axis=1)  # (B, S)

        def layer(block, x, kv):
            x, k_cache, v_cache = block.decode(
                x, *kv, kv_segments=kv_segments, segment_ids=segment_ids, positions=positions, index=index
            )
            return x, (k_cache, v_cache)

        with quantization_mode(self.cfg.quantization):
            x, (k, v) = run_layers(self.blocks, layer, self._embed(tokens), (cache.k, cache.v), scan=self.cfg.scan_layers)
            logits = self._logits(x)
        cache_axes = ("layers", "batch", "seq", "kv_heads", "head_dim")  # k, v: (L, B, S, K, Dh)
        cache = KVCache(k=constrain(k, cache_axes), v=constrain(v, cache_axes), segment_ids=kv_segments)
        return logits, cache


# --- FLOPs (PaLM §B, as MaxText counts them) ---


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention and MLP projections and the output (the
    embedding lookup is no matmul; a tied embedding counts once, as the output projection)."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
    return cfg.n_layers * per_layer + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `cfg.seq_len`: 6 per matmul
    weight (forward 2, backward 4) plus attention's two T x T matmuls. PaLM (Chowdhery et al. 2022,
    App. B) counts attention as 12·L·H·Dh·T per token; with causal masking half of it is needed, and like
    MaxText we count that half: 6·L·H·Dh·T. Rematerialisation is not counted (it is not model FLOPs)."""
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len
    return 6 * matmul_params(cfg) + attention


# --- Hugging Face LlamaForCausalLM ---
# Layouts (HF `nn.Linear` weights are (out, in)): q_proj (H*Dh, D) <-> wq (D, H, Dh); k_proj, v_proj
# (K*Dh, D) <-> wk, wv (D, K, Dh); o_proj (D, H*Dh) <-> wo (H, Dh, D); gate/up_proj (F, D) <-> w_gate/w_up
# (D, F); down_proj (D, F) <-> w_down (F, D); lm_head (V, D) <-> unembed (D, V); layers stacked on L.
# RoPE needs no permutation: llmx rotates halves of each head (`layers.rope`) exactly as HF Llama's
# `rotate_half` does, and HF checkpoints are stored for that layout (the interleaved-pair permutation
# lives only in HF's conversion script from Meta's original weights). tests/test_hf.py proves it.


def config_from_hf(hf: dict) -> dict:
    """The ModelConfig fields of a HF Llama `config.json`; anything llmx does not implement is a
    ConfigError naming the field."""
    def unsupported(field, value, allowed):
        raise ConfigError(f"Hugging Face config {field}={value!r} is not supported; llmx implements {allowed}")

    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf["hidden_act"], "'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            unsupported(flag, hf[flag], "false")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        field = "rope_parameters.rope_type" if "rope_parameters" in hf else "rope_scaling.type"
        unsupported(field, rope_type, "'default' (no RoPE scaling)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // n_heads):
        unsupported("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {d_model // n_heads}")
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d_model,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "d_ff": hf["intermediate_size"],
        "seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def config_to_hf(cfg: ModelConfig) -> dict:
    """The architecture fields of a `config.json` for transformers' LlamaForCausalLM."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # the field transformers 4.x reads
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
    }


def params_from_hf(tensors: HFTensors, cfg: ModelConfig) -> dict:
    """The nested dict of llmx parameters (as `nnx.to_pure_dict` gives) from HF tensors."""
    D, F = cfg.d_model, cfg.d_ff
    params = shared_params_from_hf(tensors, cfg)
    params["blocks"]["mlp"] = {
        "w_gate": hf_layers(tensors, cfg, "mlp.gate_proj.weight", (F, D), lambda w: w.T),  # (L, D, F)
        "w_up": hf_layers(tensors, cfg, "mlp.up_proj.weight", (F, D), lambda w: w.T),
        "w_down": hf_layers(tensors, cfg, "mlp.down_proj.weight", (D, F), lambda w: w.T),  # (L, F, D)
    }
    return params


def hf_layers(tensors: HFTensors, cfg: ModelConfig, suffix: str, shape, convert):
    """(L, ...) from model.layers.{i}.<suffix>, each converted to llmx's layout."""
    return np.stack([
        convert(tensors.take(f"model.layers.{i}.{suffix}", shape)) for i in range(cfg.n_layers)
    ]).astype(jnp.dtype(cfg.param_dtype))


def shared_params_from_hf(tensors: HFTensors, cfg: ModelConfig) -> dict:
    """Everything but the MLP: embedding, attention, norms and output (Llama-attention families share it)."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    V = cfg.vocab_size
    dtype = jnp.dtype(cfg.param_dtype)
    layers = functools.partial(hf_layers, tensors, cfg)
    params = {
        "embed": tensors.take("model.embed_tokens.weight", (V, D)).astype(dtype),  # (V, D)
        "blocks": {
            "attn_norm": {"scale": layers("input_layernorm.weight", (D,), lambda w: w)},
            "attn": {
                "wq": layers("self_attn.q_proj.weight", (H * Dh, D), lambda w: w.T.reshape(D, H, Dh)),
                "wk": layers("self_attn.k_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
                "wv": layers("self_attn.v_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
                "wo": layers("self_attn.o_proj.weight", (D, H * Dh), lambda w: w.T.reshape(H, Dh, D)),
            },
            "mlp_norm": {"scale": layers("post_attention_layernorm.weight", (D,), lambda w: w)},
        },
        "final_norm": {"scale": tensors.take("model.norm.weight", (D,)).astype(dtype)},
    }
    if cfg.tie_embeddings:
        tensors.skip("lm_head.weight")  # some tied checkpoints store the copy
    else:
        params["unembed"] = tensors.take("lm_head.weight", (V, D)).T.astype(dtype)  # (D, V)
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names -> arrays from a nested dict of numpy parameters (inverse of `params_from_hf`)."""
    out = shared_params_to_hf(params, cfg)
    mlp = params["blocks"]["mlp"]
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        out[prefix + "mlp.gate_proj.weight"] = mlp["w_gate"][i].T  # (F, D)
        out[prefix + "mlp.up_proj.weight"] = mlp["w_up"][i].T
        out[prefix + "mlp.down_proj.weight"] = mlp["w_down"][i].T  # (D, F)
    return out


def shared_params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse of `shared_params_from_hf`."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    blocks = params["blocks"]
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]["scale"]}
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        attn = blocks["attn"]
        out[prefix + "input_layernorm.weight"] = blocks["attn_norm"]["scale"][i]
        out[prefix + "post_attention_layernorm.weight"] = blocks["mlp_norm"]["scale"][i]
        out[prefix + "self_attn.q_proj.weight"] = attn["wq"][i].reshape(D, H * Dh).T  # (H*Dh, D)
        out[prefix + "self_attn.k_proj.weight"] = attn["wk"][i].reshape(D, K * Dh).T
        out[prefix + "self_attn.v_proj.weight"] = attn["wv"][i].reshape(D, K * Dh).T
        out[prefix + "self_attn.o_proj.weight"] = attn["wo"][i].reshape(H * Dh, D).T  # (D, H*Dh)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["unembed"].T  # (V, D)
    return out


FAMILY = Family(
    name="llama",
    build=Llama,
    matmul_params=matmul_params,
    flops_per_token=flops_per_token,
    hf=HFMapping(
        model_type="llama",
        architectures=("LlamaForCausalLM",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=params_from_hf,
        params_to_hf=params_to_hf,
    ),
    pipelines=True,
)
