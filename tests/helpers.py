"""Small configs and runners shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

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


def checkpoint_steps(run_dir) -> list[int]:
    """Committed checkpoints: orbax writes into a temporary directory and renames it to the step when done."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def killable(run_dir, step: int) -> bool:
    """Step `step` is logged and a checkpoint is committed: the async save of step 3 may still be writing
    when step 4 is logged (CI saw a rerun start from 0), and a kill test is about resuming from one."""
    return last_step(run_dir) >= step and bool(checkpoint_steps(run_dir))


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) and leaves_a
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


# The interpreter that AOT-compiles. The CUDA plugin prints C++ log lines on every `import jax`, so CI
# keeps the tpu/gpu extras in an environment of their own and points LLMX_AOT_PYTHON at it.
AOT_PYTHON = os.environ.get("LLMX_AOT_PYTHON", sys.executable)


def needs_extra(module: str, extra: str):
    """Skip (visibly, with -ra) only when the optional extra is absent; anything else must fail."""
    probe = (
        "import importlib.util, sys\n"
        "try:\n    found = importlib.util.find_spec(sys.argv[1]) is not None\n"
        "except ModuleNotFoundError:\n    found = False\n"  # the parent package (jax_plugins) is missing too
        "sys.exit(0 if found else 1)"
    )
    found = subprocess.run([AOT_PYTHON, "-c", probe, module], capture_output=True).returncode == 0
    if not found:
        pytest.skip(
            f"{module} is not installed for {AOT_PYTHON}: pip install -e '.[{extra}]' (or set LLMX_AOT_PYTHON "
            f"to an interpreter that has it) to AOT-compile for {extra.upper()}"
        )


# Runs `python -m llmx.train` with test hooks: a pause per step (so a kill lands mid-run) and a save
# that blocks just before Orbax's final rename (so a kill lands mid-save).
LAUNCHER = """
import os, sys, time
import llmx.batch as batch_lib
import llmx.train as train_lib
from llmx.cli import run

pause = float(os.environ.get("TEST_STEP_PAUSE", "0"))
to_global = batch_lib.to_global
def paused_to_global(local, shardings, leading, **kwargs):
    if leading:
        time.sleep(pause)
    return to_global(local, shardings, leading, **kwargs)
batch_lib.to_global = paused_to_global

block = os.environ.get("TEST_BLOCK_SAVE_OF_STEP")
if block:
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def blocked_finalize(self, *args, **kwargs):
        if self.get_final().name == block:
            (self.get_final().parent.parent / "save_blocked").write_text(str(self.get()))
            time.sleep(3600)
        return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = blocked_finalize

raise SystemExit(run(lambda: train_lib.main(sys.argv[1:])))
"""


def launch(tmp_path, env, run_dir, data_dir, *overrides, pause=0.05, block_save_of_step=None):
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER)
    env = {**env, "TEST_STEP_PAUSE": str(pause)}
    if block_save_of_step is not None:
        env["TEST_BLOCK_SAVE_OF_STEP"] = str(block_save_of_step)
    args = [sys.executable, str(launcher), *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={data_dir}", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(proc, condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return max(step_losses(run_dir), default=0) if path.exists() and path.read_text().endswith("\n") else 0
