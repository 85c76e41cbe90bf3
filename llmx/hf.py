"""Hugging Face Llama interop: `config.json` + `*.safetensors` <-> llmx ModelConfig and parameters.

    python -m llmx.hf import --hf-dir D --out R [section.key=value ...]   # a run directory at step 0
    python -m llmx.hf export --run-dir R --out D [--max-shard-size BYTES]

No torch: tensors go through `safetensors.numpy`. Layouts (HF `nn.Linear` weights are (out, in)):
  q_proj (H*Dh, D) <-> wq (D, H, Dh); k_proj, v_proj (K*Dh, D) <-> wk, wv (D, K, Dh); o_proj (D, H*Dh) <->
  wo (H, Dh, D); gate/up_proj (F, D) <-> w_gate/w_up (D, F); down_proj (D, F) <-> w_down (F, D);
  lm_head (V, D) <-> unembed (D, V); layers stacked on a leading L axis.
RoPE needs no permutation: llmx rotates halves of each head (`model.rope`) exactly as HF Llama's
`rotate_half` does, and HF checkpoints are stored for that layout (the interleaved-pair permutation
lives only in HF's conversion script from Meta's original weights). The parity test proves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx import axes
from llmx import config as config_lib
from llmx import mesh as mesh_lib
from llmx.checkpoint import Checkpointer
from llmx.cli import run as run_cli
from llmx.config import DTYPES, ModelConfig
from llmx.errors import CheckpointError, ConfigError
from llmx.model import Llama
from llmx.run import restore_run
from llmx.step import build_steps

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Buffers some older checkpoints carry; recomputed by the model, so skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise ConfigError("Hugging Face conversion needs the safetensors package: pip install safetensors") from None
    return safetensors.numpy


def model_config_from_hf(hf: dict, *, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a HF Llama `config.json`; anything llmx does not implement is a ConfigError
    naming the field."""
    def unsupported(field, value, allowed):
        raise ConfigError(f"Hugging Face config {field}={value!r} is not supported; llmx implements {allowed}")

    if hf.get("model_type") != "llama":
        unsupported("model_type", hf.get("model_type"), "'llama'")
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
    hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype or (hf_dtype if hf_dtype in DTYPES else "float32")
    values = {
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
        "param_dtype": dtype,
        "dtype": dtype,
    }
    return config_lib.from_dict({"model": values}).model


def hf_config(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """A `config.json` for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "dtype": cfg.param_dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def read_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a single-file or sharded (`model.safetensors.index.json`) checkpoint."""
    st = _safetensors()
    if (hf_dir / INDEX_FILE).is_file():
        files = sorted(set(json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"].values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise CheckpointError(f"{hf_dir / INDEX_FILE} lists {name}, which does not exist")
        tensors.update(st.load_file(str(hf_dir / name)))
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The nested dict of llmx parameters (as `nnx.to_pure_dict` gives) from HF tensors."""
    D, H, K, Dh, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    dtype = jnp.dtype(cfg.param_dtype)
    used = set()

    def get(name, shape):
        if name not in tensors:
            raise CheckpointError(f"the Hugging Face checkpoint has no tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensors[name].shape)}; the config implies {shape}")
        used.add(name)
        return tensors[name]

    def layers(suffix, shape, convert):
        # (L, ...) from model.layers.{i}.<suffix>, each converted to llmx's layout
        return np.stack([convert(get(f"model.layers.{i}.{suffix}", shape)) for i in range(L)]).astype(dtype)

    F, V = cfg.d_ff, cfg.vocab_size
    params = {
        "embed": get("model.embed_tokens.weight", (V, D)).astype(dtype),  # (V, D)
        "blocks": {
            "attn_norm": {"scale": layers("input_layernorm.weight", (D,), lambda w: w)},
            "attn": {
                "wq": layers("self_attn.q_proj.weight", (H * Dh, D), lambda w: w.T.reshape(D, H, Dh)),
                "wk": layers("self_attn.k_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
                "wv": layers("self_attn.v_proj.weight", (K * Dh, D), lambda w: w.T.reshape(D, K, Dh)),
                "wo": layers("self_attn.o_proj.weight", (D, H * Dh), lambda w: w.T.reshape(H, Dh, D)),
            },
            "mlp_norm": {"scale": layers("post_attention_layernorm.weight", (D,), lambda w: w)},
            "mlp": {
                "w_gate": layers("mlp.gate_proj.weight", (F, D), lambda w: w.T),  # (L, D, F)
                "w_up": layers("mlp.up_proj.weight", (F, D), lambda w: w.T),
                "w_down": layers("mlp.down_proj.weight", (D, F), lambda w: w.T),  # (L, F, D)
            },
        },
        "final_norm": {"scale": get("model.norm.weight", (D,)).astype(dtype)},
    }
    if not cfg.tie_embeddings:
        params["unembed"] = get("lm_head.weight", (V, D)).T.astype(dtype)  # (D, V)
    extra = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if cfg.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # some tied checkpoints store the copy
    if extra:
        raise CheckpointError(f"the Hugging Face checkpoint has tensors llmx does not use, e.g. {extra[0]}")
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names -> arrays from a nested dict of llmx parameters (inverse of `params_from_hf`)."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = jax.tree.map(np.asarray, params)
    blocks = p["blocks"]
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        attn, mlp = blocks["attn"], blocks["mlp"]
        out[prefix + "input_layernorm.weight"] = blocks["attn_norm"]["scale"][i]
        out[prefix + "post_attention_layernorm.weight"] = blocks["mlp_norm"]["scale"][i]
        out[prefix + "self_attn.q_proj.weight"] = attn["wq"][i].reshape(D, H * Dh).T  # (H*Dh, D)
        out[prefix + "self_attn.k_proj.weight"] = attn["wk"][i].reshape(D, K * Dh).T
        out[prefix + "self_attn.v_proj.weight"] = attn["wv"][i].reshape(D, K * Dh).T
        out[prefix + "self_attn.o_proj.weight"] = attn["wo"][i].reshape(H * Dh, D).T  # (D, H*Dh)
        out[prefix + "mlp.gate_proj.weight"] = mlp["w_gate"][i].T  # (F, D)
        out[prefix + "mlp.up_proj.weight"] = mlp["w_up"][i].T
        out[prefix + "mlp.down_proj.weight"] = mlp["w_down"][i].T  # (D, F)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["unembed"].T  # (V, D)
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def load(hf_dir: str | Path, *, dtype: str | None = None) -> tuple[ModelConfig, Llama]:
    """(config, model) of a HF Llama directory; `model(tokens (B, T) int32)` gives fp32 logits (B, T, V).
    `dtype` overrides the parameter and compute dtype (default: the checkpoint's)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_hf(read_tensors(hf_dir), cfg)))
    return cfg, nnx.merge(graphdef, state)


def save(cfg: ModelConfig, params: dict, out_dir: str | Path, *, max_shard_size: int = 0, tokenizer=None) -> Path:
    """Writes `config.json` and the weights (sharded with an index when `max_shard_size` bytes is set
    and exceeded) for transformers' LlamaForCausalLM."""
    st = _safetensors()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = {k: getattr(tokenizer, f"{k}_id", None) for k in ("bos", "eos", "pad")}
    (out_dir / "config.json").write_text(json.dumps(
        hf_config(cfg, bos_id=special["bos"], eos_id=special["eos"], pad_id=special["pad"]), indent=2))
    tensors = params_to_hf(params, cfg)
    shards: list[dict] = [{}]
    size = 0
    for name, array in tensors.items():
        if max_shard_size and shards[-1] and size + array.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        st.save_file(shards[0], str(out_dir / SINGLE_FILE), metadata=metadata)
        return out_dir
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, str(out_dir / name), metadata=metadata)
        weight_map.update({t: name for t in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return out_dir


def import_run(hf_dir: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """A run directory at step 0 from a HF model: config.yaml (the HF model section, other sections
    from defaults and `overrides`) and a checkpoint in the trainer's layout, so `llmx.train` fine-tunes
    from it and `llmx.generate --run-dir` samples from it."""
    model_cfg, model = load(hf_dir)
    raw = {"model": dataclasses.asdict(model_cfg), "train": {"run_dir": str(out)}}
    for text in overrides:
        section, key, value = config_lib.parse_override(text)
        raw.setdefault(section, {})[key] = value
    cfg = config_lib.from_dict(raw)
    params = nnx.state(model, nnx.Param)
    # The trainer's own state at step 0 around these weights (optimizer, fp16 loss scale and all), on
    # one device: checkpoints restore onto any mesh.
    one_device = cfg.replace(mesh=axes.single_device())
    steps = build_steps(one_device, mesh_lib.make_mesh(one_device.mesh, jax.devices()[:1]))
    state = steps.init_from_params(params)
    data_state = {}  # no data consumed yet: the trainer starts a fresh iterator from an empty state
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint)
    ckpt.save(0, state, data_state=data_state, config_yaml=cfg.to_yaml())
    ckpt.wait()
    ckpt.close()
    return out


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | None = None, max_shard_size: int = 0) -> Path:
    """A HF model directory from a run's newest checkpoint (or `checkpoint`)."""
    run = restore_run(run_dir=str(run_dir), checkpoint=checkpoint, single_device=True)
    return save(run.cfg.model, nnx.to_pure_dict(run.params), out, max_shard_size=max_shard_size, tokenizer=run.tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF model directory -> llmx run directory (step 0)")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--out", required=True, help="the run directory to write")
    imp.add_argument("overrides", nargs="*", help="section.key=value for the run (data, optim, train, ...)")
    exp = sub.add_parser("export", help="llmx run directory -> HF model directory")
    exp.add_argument("--run-dir", required=True)
    exp.add_argument("--out", required=True, help="the HF model directory to write")
    exp.add_argument("--checkpoint", help="a checkpoint directory (default: the newest of the run)")
    exp.add_argument("--max-shard-size", type=int, default=0, help="bytes per safetensors file (0: one file)")
    args = parser.parse_args(argv)
    if args.command == "import":
        out = import_run(args.hf_dir, args.out, args.overrides)
    else:
        out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, max_shard_size=args.max_shard_size)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
