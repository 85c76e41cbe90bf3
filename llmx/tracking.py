"""Experiment tracking: Weights & Biases (the optional `wandb` extra), switched on by `train.wandb_project`.

Process 0 logs the same records as `metrics.jsonl` (each at its step) and the resolved config, into one
W&B run per run directory: its id is kept in `run_dir/wandb_run_id`, so a rerun that resumes the
training resumes the W&B run too (`resume="allow"`). `WANDB_MODE=offline` writes it under
`run_dir/wandb` for a later `wandb sync`. The trainer imports wandb only when a project is configured.
"""

from __future__ import annotations

import importlib
import secrets
from pathlib import Path

from llmx import storage
from llmx.config import Config
from llmx.errors import ConfigError

RUN_ID_FILE = "wandb_run_id"


def _import_wandb():
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError("train.wandb_project is set but wandb is not installed: pip install -e '.[wandb]'") from None


class WandbRun:
    """One W&B run for `run_dir`, created or resumed; `log` takes metrics.jsonl's records."""

    def __init__(self, cfg: Config, run_dir: Path):
        wandb = _import_wandb()
        t = cfg.train
        id_file = storage.path(run_dir) / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        self.run = wandb.init(
            project=t.wandb_project, entity=t.wandb_entity or None, name=t.wandb_run_name or None,
            tags=[tag.strip() for tag in t.wandb_tags.split(",") if tag.strip()] or None, id=run_id, resume="allow",
            dir=None if storage.is_remote(run_dir) else str(run_dir),  # W&B's own files are local: ./wandb for a bucket
            config=cfg.to_dict(),
        )
        id_file.write_text(run_id + "\n")

    def log(self, step: int, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()
