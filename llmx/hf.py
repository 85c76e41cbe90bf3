"""Hugging Face interop: `config.json` + `*.safetensors` <-> llmx ModelConfig and parameters.

    python -m llmx.hf import --hf-dir D --out R [section.key=value ...]   # a run directory at step 0
    python -m llmx.hf export --run-dir R --out D [--max-shard-size BYTES] [--merge-lora]

No torch: tensors go through `safetensors.numpy`. This module reads and writes the files; the family
that handles `config.json`'s `model_type` (import) or `model.family` (export) maps the names and layouts
(`llmx.models`, e.g. `llmx.models.llama`)."""

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
from llmx import models, runlock, storage
from llmx.models import lora
from llmx.checkpoint import Checkpointer
from llmx.cli import run as run_cli
from llmx.config import DTYPES, ModelConfig
from llmx.errors import CheckpointError, ConfigError
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
    """The ModelConfig of a HF `config.json`, by the family that reads its `model_type`; anything llmx
    does not implement is a ConfigError naming the field. `dtype` defaults to the checkpoint's."""
    family = models.for_hf_model_type(hf.get("model_type"))
    hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype or (hf_dtype if hf_dtype in DTYPES else "float32")
    values = {"family": family.name, **family.hf.config_from_hf(hf), "param_dtype": dtype, "dtype": dtype}
    return config_lib.from_dict({"model": values}).model


def hf_config(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """A `config.json` for the transformers class of the model's family."""
    mapping = _mapping(cfg)
    return {
        "architectures": list(mapping.architectures),
        "model_type": mapping.model_type,
        **mapping.config_to_hf(cfg),
        "dtype": cfg.param_dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def _mapping(cfg: ModelConfig) -> models.HFMapping:
    family = models.get(cfg.family)
    if family.hf is None:
        raise ConfigError(f"model.family={cfg.family} has no Hugging Face mapping; export needs one of the families "
                          f"{', '.join(name for name, f in models.FAMILIES.items() if f.hf is not None)}")
    return family.hf


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
    """The nested dict of llmx parameters (as `nnx.to_pure_dict` gives) from HF tensors; a tensor the
    family does not read is a CheckpointError."""
    available = models.HFTensors(tensors)
    params = _mapping(cfg).params_from_hf(available, cfg)
    extra = [n for n in available.untaken() if not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise CheckpointError(f"the Hugging Face checkpoint has tensors llmx does not use, e.g. {extra[0]}")
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names -> arrays from a nested dict of llmx parameters (inverse of `params_from_hf`)."""
    tensors = _mapping(cfg).params_to_hf(jax.tree.map(np.asarray, params), cfg)
    return {name: np.ascontiguousarray(a) for name, a in tensors.items()}


def load(hf_dir: str | Path, *, dtype: str | None = None) -> tuple[ModelConfig, nnx.Module]:
    """(config, model) of a HF model directory; `model(tokens (B, T) int32)` gives fp32 logits (B, T, V).
    `dtype` overrides the parameter and compute dtype (default: the checkpoint's)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), dtype=dtype)
    build = models.get(cfg.family).build
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_hf(read_tensors(hf_dir), cfg)))
    return cfg, nnx.merge(graphdef, state)


def save(cfg: ModelConfig, params: dict, out_dir: str | Path, *, max_shard_size: int = 0, tokenizer=None) -> Path:
    """Writes `config.json` and the weights (sharded with an index when `max_shard_size` bytes is set
    and exceeded) for the transformers class of the model's family."""
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
    storage.check("--out", str(out), remote_ok=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with runlock.hold(out):  # it writes a run directory, as a trainer does
        (out / "config.yaml").write_text(cfg.to_yaml())
        ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint)
        ckpt.save(0, state, data_state=data_state, config_yaml=cfg.to_yaml())
        ckpt.wait()
        ckpt.close()
    return out


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | None = None, max_shard_size: int = 0,
               merge_lora: bool = False) -> Path:
    """A HF model directory from a run's newest checkpoint (or `checkpoint`); a LoRA run's adapters are
    folded into the base weights (`merge_lora`), so the result is a plain model transformers loads."""
    run = restore_run(run_dir=str(run_dir), checkpoint=checkpoint, single_device=True)
    model_cfg, params = run.cfg.model, nnx.to_pure_dict(run.params)
    if model_cfg.lora_rank and not merge_lora:
        raise ConfigError(f"{run_dir} trains LoRA adapters (model.lora_rank={model_cfg.lora_rank}); export them "
                          "folded into the base weights with --merge-lora")
    if merge_lora and not model_cfg.lora_rank:
        raise ConfigError(f"--merge-lora: {run_dir} has no LoRA adapters (model.lora_rank=0); export it without the flag")
    if merge_lora:
        params, model_cfg = lora.merged(params, model_cfg), dataclasses.replace(model_cfg, lora_rank=0)
    return save(model_cfg, params, out, max_shard_size=max_shard_size, tokenizer=run.tokenizer)


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
    exp.add_argument("--merge-lora", action="store_true", help="fold a LoRA run's adapters into the base weights")
    args = parser.parse_args(argv)
    if args.command == "import":
        out = import_run(args.hf_dir, args.out, args.overrides)
    else:
        out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, max_shard_size=args.max_shard_size,
                         merge_lora=args.merge_lora)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
