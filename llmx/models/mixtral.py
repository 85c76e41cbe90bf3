"""The Mixtral family (Jiang et al. 2024): Llama attention, and in every block a sparse mixture of E SwiGLU
experts of which each token uses k (`llmx.models.moe`), its FLOPs per token and its Hugging Face mapping
(`MixtralForCausalLM`).

The forward returns logits like every family's; the layers' router statistics leave the layer scan as its
stacked outputs and are sown as an `nnx.Intermediate` (`moe_stats`), which `llmx.step` turns into the
load-balancing and z losses and the MoE metrics (`auxiliary`). Not built (one-line config errors):
pipeline and sequence parallelism, quantized weights, QAT, LoRA, pruning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.config import ModelConfig
from llmx.errors import CheckpointError, ConfigError
from llmx.mesh import constrain
from llmx.models import llama, moe
from llmx.models.family import Family, HFMapping, HFTensors
from llmx.models.layers import Attention, RMSNorm, run_layers


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.moe = moe.MoE(cfg, rngs=rngs)

    def __call__(self, x, segment_ids, positions):
        """-> (x (B, T, D), this layer's router stats)."""
        x = x + self.attn(self.attn_norm(x), segment_ids, positions)
        y, stats = self.moe(self.mlp_norm(x))
        return constrain(x + y, ("batch", "seq", "embed")), stats

    def decode(self, x, k_cache, v_cache, *, kv_segments, segment_ids, positions, index):
        attn, k_cache, v_cache = self.attn.decode(
            self.attn_norm(x), k_cache, v_cache,
            kv_segments=kv_segments, segment_ids=segment_ids, positions=positions, index=index,
        )
        x = x + attn
        y, _ = self.moe(self.mlp_norm(x))
        return constrain(x + y, ("batch", "seq", "embed")), k_cache, v_cache


class Mixtral(llama.Llama):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, block=MoEBlock)

    def __call__(self, tokens, segment_ids=None, positions=None):
        """Logits (B, T, V) fp32; the layers' router stats (L, ...) are sown as `moe_stats`."""
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

        def layer(block, x, _):
            return block(x, segment_ids, positions)

        x, stats = run_layers(self.blocks, layer, self._embed(tokens), scan=cfg.scan_layers, remat=cfg.remat)
        self.moe_stats = nnx.Intermediate(stats)
        return self._logits(x)


def auxiliary(model: nnx.Module) -> tuple[jax.Array, dict]:
    """(penalty added to the mean loss, metrics) from what the last forward sowed (`moe.auxiliary`)."""
    return moe.auxiliary(model.moe_stats.get_value(), model.cfg)


# --- FLOPs: active parameters only (k of E experts per token), as MaxText and DeepSpeed-MoE count them


def matmul_params(cfg: ModelConfig) -> int:
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + D * cfg.n_experts + cfg.experts_per_token * 3 * D * cfg.expert_d_ff
    return cfg.n_layers * per_layer + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig) -> float:
    """As `llama.flops_per_token`, with the router and the k active experts as the MLP."""
    return 6 * matmul_params(cfg) + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len


# --- Hugging Face MixtralForCausalLM. Hub layout: block_sparse_moe.gate.weight (E, D) <-> router (D, E);
# block_sparse_moe.experts.{e}.w1 / w3 (F, D) <-> w_gate / w_up[e] (D, F); w2 (D, F) <-> w_down[e] (F, D).
# transformers >= 5 holds the experts merged (mlp.experts.gate_up_proj (E, 2F, D), gate rows first;
# mlp.experts.down_proj (E, D, F); mlp.gate.weight) and saves the hub layout; import accepts both.


def config_from_hf(hf: dict) -> dict:
    for field, allowed in (("sliding_window", None), ("router_jitter_noise", 0.0)):
        if hf.get(field) not in (allowed, 0):
            raise ConfigError(f"Hugging Face config {field}={hf[field]!r} is not supported; llmx implements {allowed!r}")
    return {
        **llama.config_from_hf(hf),
        "n_experts": hf["num_local_experts"],
        "experts_per_token": hf["num_experts_per_tok"],
        "moe_d_ff": hf["intermediate_size"],
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
    }


def config_to_hf(cfg: ModelConfig) -> dict:
    out = llama.config_to_hf(cfg)
    for field in ("attention_bias", "mlp_bias"):
        out.pop(field)
    return {
        **out,
        "intermediate_size": cfg.expert_d_ff,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "output_router_logits": False,
    }


def _experts_from_hf(tensors: HFTensors, cfg: ModelConfig, i: int) -> dict:
    """Layer i's router and experts in llmx's layout, from either HF layout."""
    D, E, F = cfg.d_model, cfg.n_experts, cfg.expert_d_ff
    prefix = f"model.layers.{i}."
    if tensors.has(prefix + "block_sparse_moe.gate.weight"):
        hub = prefix + "block_sparse_moe."
        expert = lambda e, w, shape: tensors.take(f"{hub}experts.{e}.{w}.weight", shape)  # noqa: E731
        return {
            "router": tensors.take(hub + "gate.weight", (E, D)).T,  # (D, E)
            "w_gate": np.stack([expert(e, "w1", (F, D)).T for e in range(E)]),  # (E, D, F)
            "w_up": np.stack([expert(e, "w3", (F, D)).T for e in range(E)]),
            "w_down": np.stack([expert(e, "w2", (D, F)).T for e in range(E)]),  # (E, F, D)
        }
    for block in ("mlp.", "block_sparse_moe."):
        if tensors.has(prefix + block + "experts.gate_up_proj"):
            merged = prefix + block
            gate_up = tensors.take(merged + "experts.gate_up_proj", (E, 2 * F, D))
            return {
                "router": tensors.take(merged + "gate.weight", (E, D)).T,
                "w_gate": gate_up[:, :F].transpose(0, 2, 1),  # (E, D, F)
                "w_up": gate_up[:, F:].transpose(0, 2, 1),
                "w_down": tensors.take(merged + "experts.down_proj", (E, D, F)).transpose(0, 2, 1),  # (E, F, D)
            }
    raise CheckpointError(f"the Hugging Face checkpoint has no experts for layer {i} "
                          f"({prefix}block_sparse_moe.gate.weight or {prefix}mlp.experts.gate_up_proj)")


def params_from_hf(tensors: HFTensors, cfg: ModelConfig) -> dict:
    params = llama.shared_params_from_hf(tensors, cfg)
    layers = [_experts_from_hf(tensors, cfg, i) for i in range(cfg.n_layers)]
    dtype = jnp.dtype(cfg.param_dtype)
    params["blocks"]["moe"] = {name: np.stack([layer[name] for layer in layers]).astype(dtype) for name in layers[0]}
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = llama.shared_params_to_hf(params, cfg)
    experts = params["blocks"]["moe"]
    for i in range(cfg.n_layers):
        hub = f"model.layers.{i}.block_sparse_moe."
        out[hub + "gate.weight"] = experts["router"][i].T  # (E, D)
        for e in range(cfg.n_experts):
            out[f"{hub}experts.{e}.w1.weight"] = experts["w_gate"][i, e].T  # (F, D)
            out[f"{hub}experts.{e}.w3.weight"] = experts["w_up"][i, e].T
            out[f"{hub}experts.{e}.w2.weight"] = experts["w_down"][i, e].T  # (D, F)
    return out


FAMILY = Family(
    name="mixtral",
    build=Mixtral,
    matmul_params=matmul_params,
    flops_per_token=flops_per_token,
    hf=HFMapping(
        model_type="mixtral",
        architectures=("MixtralForCausalLM",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=params_from_hf,
        params_to_hf=params_to_hf,
    ),
    auxiliary=auxiliary,
)
