"""Run a DeepSpeed `ds_config.json` as it is.

    python -m llmx.train --config model.yaml --deepspeed ds_config.json [section.key=value ...]
    python -m llmx.config from-deepspeed ds_config.json [--config model.yaml]     # the llmx YAML

Precedence: the llmx config < the ds_config < command-line overrides. `read` parses and checks the
JSON (`llmx.ds_keys`: unknown keys, wrong types, features llmx lacks are one-line errors); `load` translates
it (`llmx.ds_translate`) on top of the llmx config, resolving "auto" values from it and the batch sizes from
the mesh's data-parallel size; `to_yaml` prints the result with the DeepSpeed key of every value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from llmx import config as config_lib
from llmx import ds_keys, ds_translate
from llmx import mesh as mesh_lib
from llmx.config import Config
from llmx.ds_translate import Translation
from llmx.errors import ConfigError

WHY_IGNORED = ("XLA buckets, overlaps, prefetches and places collectives and buffers itself; "
               "the README's 'From DeepSpeed' table gives each reason")


@dataclasses.dataclass(frozen=True)
class DeepSpeedConfig:
    path: str
    values: dict
    ignored: tuple[str, ...]  # keys with no llmx analogue

    @property
    def warnings(self) -> list[str]:
        if not self.ignored:
            return []
        return [f"ds_config keys with no llmx analogue, ignored ({WHY_IGNORED}): {', '.join(self.ignored)}"]


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"ds_config has the key '{key}' twice (DeepSpeed refuses duplicates too)")
        seen[key] = value
    return seen


def read(path: str | Path) -> DeepSpeedConfig:
    """The checked ds_config: raises a one-line ConfigError for anything llmx cannot run as written."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config {path} does not exist")
    try:
        values = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"ds_config {path} is not JSON: not UTF-8 text") from None
    if not isinstance(values, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object of DeepSpeed keys")
    findings = ds_keys.check(values)
    return DeepSpeedConfig(str(path), values, tuple(findings.ignored))


def load(config_path: str | None, ds: DeepSpeedConfig, overrides: list[str] = (), *,
         n_devices: int) -> tuple[Config, Translation]:
    """llmx config < ds_config < overrides, on `n_devices` devices (the batch rule needs the
    data-parallel size)."""
    llmx_cfg = config_lib.load(config_path, overrides)  # what "auto" means
    out = ds_translate.translate(ds.values, llmx_cfg)
    mesh_cfg = config_lib.load(config_path, overrides, base=out.values).mesh
    sizes = mesh_lib.mesh_shape(mesh_cfg, n_devices)
    mesh_text = f"mesh.data {sizes['data']} x mesh.fsdp {sizes['fsdp']} on {n_devices} devices"
    ds_translate.batch(ds.values, llmx_cfg, out, data_parallel=sizes["data"] * sizes["fsdp"], mesh_text=mesh_text)
    return config_lib.load(config_path, overrides, base=out.values), out


def _scalar(value) -> str:
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def to_yaml(cfg: Config, out: Translation, *, ds_path: str, overrides: list[str] = ()) -> str:
    """The whole llmx config as YAML; a comment on each value that came from the ds_config."""
    from_command_line = {".".join(config_lib.parse_override(o)[:2]) for o in overrides}
    lines = [f"# llmx config for DeepSpeed's {ds_path} (python -m llmx.config from-deepspeed)",
             "# a comment names the DeepSpeed key each value came from"]
    for section, values in cfg.to_dict().items():
        lines.append(f"{section}:")
        for key, value in values.items():
            line = f"  {key}: {_scalar(value)}"
            source = out.sources.get(f"{section}.{key}")
            if source and f"{section}.{key}" not in from_command_line:
                line += f"  # {source}"
            lines.append(line)
    return "\n".join(lines) + "\n"
