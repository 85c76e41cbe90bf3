"""The sweep file: a run config plus a `sweep:` section, parsed and checked before anything runs.

`llmx.config` is strict (an unknown section is an error), so the `sweep:` section is taken out here and
the rest goes to `llmx.config.from_dict` as a base config. Every parameter of the search space names a
config key (`optim.lr`); its bounds and choices are tried on the base config up front, so a bad value
is a one-line error before the first trial, not a failed trial an hour later.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from llmx import config as config_lib
from llmx.config import Config
from llmx.errors import ConfigError

KINDS = ("log_uniform", "uniform", "int", "choice", "grid")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "asha")
BACKENDS = ("local", "ray")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: `kind` is a range (log_uniform, uniform, int) or a list (choice, grid)."""

    path: str  # "optim.lr"
    kind: str
    values: tuple  # (low, high) for ranges; the candidates for choice and grid

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.path.split(".", 1)[1]

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")


@dataclasses.dataclass(frozen=True)
class SystemSpace:
    """`--mode system`: what to enumerate. Empty lists mean: every value that applies."""

    zero_stage: tuple = (0, 1, 2, 3)
    remat: tuple = ("none", "full")
    micro_batch_size: tuple = ()  # () : the global batch in one micro-step and in two
    mesh: tuple = ()  # ((data, fsdp, tensor), ...); () : every layout of the devices
    measure: int = 3  # the best this many by estimate are timed for real (local target only)
    measure_steps: int = 5


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    space: tuple[Param, ...] = ()
    sampler: str = "tpe"
    trials: int = 0  # 0: the whole grid (sampler=grid); 20 otherwise
    metric: str = "eval_loss"
    direction: str = "minimize"
    pruner: str = "none"
    min_steps: int = 0  # no pruning before this step; ASHA's first rung (0: train.eval_every)
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    startup_trials: int = 5  # TPE's random trials before it models; median's trials before it prunes
    parallel: int = 1
    backend: str = "local"
    platform: str = "auto"
    devices_per_trial: int = 0  # 0: the local devices split evenly over `parallel`
    ray_address: str = ""  # "": an in-process Ray; "auto" or host:port: an existing cluster
    dir: str = ""
    seed: int = 0
    system: SystemSpace = SystemSpace()

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.space)

    @property
    def n_trials(self) -> int:
        if self.sampler == "grid":
            return min(self.trials, self.grid_size) if self.trials else self.grid_size
        return self.trials or 20


_SCALARS = {f.name: f for f in dataclasses.fields(SweepSpec) if f.name not in ("space", "system")}
_SYSTEM = {f.name: f for f in dataclasses.fields(SystemSpace)}
_CHOICES = {"sampler": SAMPLERS, "pruner": PRUNERS, "backend": BACKENDS, "platform": PLATFORMS,
            "direction": ("minimize", "maximize")}


def config_paths(cfg: Config) -> dict[str, Any]:
    """Every `section.key` of a config with its current value."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def _number(text_or_number, where: str) -> float:
    if isinstance(text_or_number, bool) or not isinstance(text_or_number, (int, float, str)):
        raise ConfigError(f"{where}: {text_or_number!r} is not a number")
    try:
        return float(text_or_number)  # YAML 1.1 reads "1e-3" as a string
    except ValueError:
        raise ConfigError(f"{where}: {text_or_number!r} is not a number") from None


def _like(value, default, where: str):
    """A YAML value in the type of the config key's default (1e-3 written as a string -> float)."""
    if isinstance(default, float) and not isinstance(value, bool):
        return _number(value, where)
    return value


def closest_key(path: str, paths: list[str]) -> str | None:
    """The config key a mistyped path most likely meant: a key spelled by the path's initials
    (optim.learning_rate -> optim.lr), else the most similar spelling."""
    section, _, key = path.partition(".")
    initials = "".join(word[:1] for word in key.split("_"))
    for candidate in paths:
        c_section, _, c_key = candidate.partition(".")
        if c_section == section and len(initials) > 1 and c_key == initials:
            return candidate
    close = difflib.get_close_matches(path, paths, n=1, cutoff=0.5)
    return close[0] if close else None


def parse_param(path: str, raw: Any, base: Config) -> Param:
    where = f"sweep.space.{path}"
    paths = config_paths(base)
    if path not in paths:
        close = closest_key(path, list(paths))
        hint = f"; did you mean {close}?" if close else "; parameters are config keys like optim.lr"
        raise ConfigError(f"{where}: unknown config key '{path}'{hint}")
    if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in KINDS):
        raise ConfigError(f"{where} must be one of {{{': ..., '.join(KINDS)}: ...}}, e.g. {{log_uniform: [1e-4, 1e-2]}}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    default = paths[path]
    if kind in ("choice", "grid"):
        values = [_like(v, default, where) for v in values]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: {kind} lists a value twice: {values}")
    else:
        if len(values) != 2:
            raise ConfigError(f"{where}: {kind} needs [low, high], got {values!r}")
        if kind == "int":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}: int needs two integers [low, high], got {values!r}")
            if not isinstance(default, int) or isinstance(default, bool):
                raise ConfigError(f"{where}: {path} is not an integer key; use uniform or choice")
        else:
            values = [_number(v, where) for v in values]
            if not isinstance(default, float):
                raise ConfigError(f"{where}: {path} is not a float key; use int or choice")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}: [{low}, {high}] is an empty range; the low bound must be below the high one")
        if kind == "log_uniform" and low <= 0:
            raise ConfigError(f"{where}: log_uniform needs positive bounds, got [{low}, {high}]; use uniform for 0")
    param = Param(path, kind, tuple(values))
    # The bounds (or every choice) must be values the config accepts: checked now, not in a trial.
    for value in param.values:
        try:
            base.replace(**{param.section: {param.key: value}})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return param


def _scalar(name: str, value: Any, fields: dict, where: str):
    field = fields[name]
    default = field.default
    if isinstance(default, bool) or not isinstance(default, (int, str, tuple)):
        raise ConfigError(f"{where} cannot be set")
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} must be a list")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"{where}={value!r} must be an integer >= 0")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of: {', '.join(_CHOICES[name])}")
    return value


def parse_sweep(raw: Any, base: Config) -> SweepSpec:
    """The `sweep:` mapping -> SweepSpec, every key and parameter checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the sweep section must be a mapping (space, sampler, trials, ...)")
    known = {"space", "system", *_SCALARS}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"unknown key 'sweep.{key}'" + (f"; did you mean sweep.{close[0]}?" if close else
                              f"; sweep keys are: {', '.join(sorted(known))}"))
    kwargs = {name: _scalar(name, value, _SCALARS, f"sweep.{name}") for name, value in raw.items() if name in _SCALARS}
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError("sweep.space must map config keys to ranges, e.g. optim.lr: {log_uniform: [1e-4, 1e-2]}")
    system = raw.get("system") or {}
    if not isinstance(system, dict) or any(k not in _SYSTEM for k in system):
        raise ConfigError(f"sweep.system keys are: {', '.join(_SYSTEM)}")
    spec = SweepSpec(
        **kwargs,
        space=tuple(parse_param(str(path), value, base) for path, value in space.items()),
        system=SystemSpace(**{k: _scalar(k, v, _SYSTEM, f"sweep.system.{k}") for k, v in system.items()}),
    )
    if spec.parallel < 1:
        raise ConfigError("sweep.parallel must be at least 1")
    if spec.reduction_factor < 2:
        raise ConfigError("sweep.reduction_factor must be at least 2")
    return spec


def check_hyper(spec: SweepSpec) -> None:
    """What a hyper-parameter search (not --mode system) needs on top of a well-formed section."""
    if not spec.space:
        raise ConfigError("sweep.space is empty; add e.g. optim.lr: {log_uniform: [1e-4, 1e-2]}")
    if spec.sampler == "grid":
        ranged = [p.path for p in spec.space if not p.discrete]
        if ranged:
            raise ConfigError(f"sampler=grid needs listed values; give {ranged[0]} a {{grid: [...]}} instead of a range")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """`section.key=value` for the run config, `sweep.key=value` (and `sweep.space.a.b=...`) for the sweep."""
    run, sweep = [], []
    for text in overrides:
        if text.startswith("sweep."):
            path, sep, value = text.partition("=")
            if not sep:
                raise ConfigError(f"override '{text}' is not of the form sweep.key=value")
            sweep.append((path[len("sweep."):], yaml.safe_load(value) if value else ""))
        else:
            run.append(text)
    return run, sweep


def load(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, SweepSpec, str]:
    """(base config, sweep spec, sweep name) from a sweep file and overrides."""
    raw = config_lib.read_yaml(path)
    path = Path(path) if path is not None else None
    sweep_raw = raw.pop("sweep", None) or {}
    run_overrides, sweep_overrides = split_overrides(list(overrides))
    for text in run_overrides:
        section, key, value = config_lib.parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][key] = value
    base = config_lib.from_dict(raw)
    for key, value in sweep_overrides:
        if key.startswith("space."):
            sweep_raw.setdefault("space", {})[key[len("space."):]] = value
        elif key.startswith("system."):
            sweep_raw.setdefault("system", {})[key[len("system."):]] = value
        else:
            sweep_raw[key] = value
    name = re.sub(r"[^\w.-]", "_", path.stem) if path is not None else "sweep"
    return base, parse_sweep(sweep_raw, base), name


def trial_config(base: Config, params: dict[str, Any], *, run_dir: str | Path, progress: bool = False) -> Config:
    """The base config with a trial's parameters, its own run directory, and no progress bar (a log file
    is no terminal)."""
    sections: dict[str, dict] = {}
    for path, value in params.items():
        section, key = path.split(".", 1)
        sections.setdefault(section, {})[key] = value
    sections.setdefault("train", {}).update(run_dir=str(run_dir), progress=progress)
    return base.replace(**sections)
