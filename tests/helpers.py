"""Small configs and runners shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from llmx import config as config_lib

REPO = Path(__file__).resolve().parents[1]

# A model small enough to compile and train in seconds on 2 cores, with every feature switched on:
# grouped-query attention (4 query heads on 2 KV heads), untied output, two scanned layers.
SMALL = [
    "model.vocab_size=384",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=64",
    "model.seq_len=32",
    "data.max_documents=80",
    "data.validation_percent=20",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "train.progress=false",
    "optim.warmup_steps=2",
]


def small_config(tmp_path: Path, data_dir: Path, *overrides: str, config_file: str | None = None):
    base = [] if config_file else SMALL
    return config_lib.load(
        config_file,
        [*base, f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_dir}", *overrides],
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
