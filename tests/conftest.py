"""Test setup: 8 simulated CPU devices (set before jax is imported), no persistent compilation
cache in-process, and a small prepared corpus shared by the whole session."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMX_TEST_CACHE", Path.home() / ".cache" / "llmx" / "tests"))
# No persistent compilation cache in this process: its steps run on 8 CPU devices, and an XLA:CPU
# executable with collectives loaded from the cache can deadlock (llmx.train.enable_compilation_cache;
# CI aborted in test_pipeline on one). The cache would save ~20 s of single-device compiles here; the
# `python -m llmx.train` subprocesses keep theirs (train.compilation_cache_dir) where they run on one device.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Prepared corpora live here for the whole session (and across sessions: it is keyed by content)."""
    path = CACHE / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def subprocess_env(data_dir) -> dict:
    """Environment for `python -m llmx.X` subprocesses: 8 CPU devices, shared caches."""
    env = dict(os.environ)
    env["LLMX_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def pytest_collection_modifyitems(config, items):
    """The quick tier (`-m "not slow"`, ~5 min on 2 cores) leaves to the full suite (CI) what costs seconds
    per test whatever it checks: AOT compiles for TPU/GPU targets (a subprocess of the AOT environment,
    10-40 s each) and every test that runs `python -m llmx.X` (the `subprocess_env` fixture: an interpreter,
    jax and a compile, ~4 s before the command does anything)."""
    for item in items:
        if (item.get_closest_marker("aot_tpu") or item.get_closest_marker("aot_gpu")
                or "subprocess_env" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
