"""A finished or running training run, reopened for reading: its config, its compiled steps on its
training mesh (or one device), its parameters at a checkpoint, and its tokenizer.

`llmx.evaluate`, `llmx.generate` and `llmx.hf export` start here. Nothing here writes to the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax

from llmx import axes, storage
from llmx import config as config_lib
from llmx import data as data_lib
from llmx import mesh as mesh_lib
from llmx.checkpoint import Checkpointer, load_params, resolve
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.step import Steps, build_steps


@dataclasses.dataclass
class RestoredRun:
    cfg: Config
    steps: Steps
    params: object  # nnx.State placed with the training shardings
    step: int
    checkpoint: Path
    tokenizer: object


def load_config(*, run_dir: str | None, config: str | None, overrides: Sequence[str]) -> Config:
    """The config of `run_dir` (its config.yaml, with run_dir pointing at it) or of a YAML file."""
    if run_dir:
        storage.check("--run-dir", run_dir)
        path = storage.path(run_dir) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a run directory: it has no config.yaml")
        return config_lib.load(path, [f"train.run_dir={run_dir}", *overrides])
    return config_lib.load(config, list(overrides))


def restore_run(
    *, run_dir: str | None = None, config: str | None = None, overrides: Sequence[str] = (),
    checkpoint: str | None = None, single_device: bool = False,
) -> RestoredRun:
    """A run's config, compiled steps on its training mesh (or one device) and the parameters of
    `checkpoint` (a step directory or a directory of steps) or of the run's newest checkpoint."""
    cfg = load_config(run_dir=run_dir, config=config, overrides=overrides)
    devices = jax.devices()[:1] if single_device else None
    if single_device:
        cfg = cfg.replace(mesh=axes.single_device())
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    given_as, path = ("--checkpoint", checkpoint) if checkpoint else ("--run-dir", cfg.train.run_dir)
    directory, step = resolve(path, given_as=given_as)
    source = Checkpointer(directory, cfg.checkpoint, read_only=True)
    try:
        params = load_params(source, step, steps, cfg.checkpoint)
    finally:
        source.close()
    # The run's own tokenizer.json (BPE) wins over any cached or retrained one.
    tokenizer = data_lib.build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size, run_dir=storage.path(cfg.train.run_dir))
    return RestoredRun(cfg, steps, params, step, source.step_dir(step), tokenizer)
