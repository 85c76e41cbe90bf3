"""`llmx.plan --target`: the real train step of a 1B-parameter config AOT-compiled for a TPU v5e slice
and an 8 x H100 host on this CPU machine, with memory against the device's HBM."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import AOT_PYTHON, needs_extra

# Batch shape kept small so the compile stays quick; the parameters are the full ~1B.
ONE_B = ["--config", "configs/llama_1b_v5e8.yaml", "train.micro_batch_size=1", "model.seq_len=1024"]


def run_plan(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([AOT_PYTHON, "-m", "llmx.plan", "--json", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _common_checks(plan: dict, *, devices: int, zero_stage: int):
    assert 0.9e9 < plan["parameters"] < 1.1e9
    assert plan["devices"] == devices and plan["mesh"]["fsdp"] == devices
    assert plan["state_bytes"]["total"] == pytest.approx(plan["zero_expected_bytes"]["total"], rel=0.05)
    assert plan["compiled_bytes"]["temporaries"] > 0 and plan["model_flops_per_step_per_device"] > 1e12
    assert (plan["collectives"]["all-gather"] > 0) == (zero_stage == 3)  # ZeRO-3 gathers parameters
    assert 0 < plan["estimated_mfu"] <= 1 and plan["estimated_step_seconds"] > 0


@pytest.mark.aot_tpu
def test_plan_1b_for_tpu_v5e_reports_that_it_does_not_fit():
    needs_extra("libtpu", "tpu")
    # Unsharded optimizer state (ZeRO-0): 16 bytes per parameter on every 16 GiB chip cannot fit.
    # The TPU compiler itself refuses it (RESOURCE_EXHAUSTED); the plan reports its numbers.
    plan = run_plan(*ONE_B, "mesh.zero_stage=0", "--target", "v5e:2x2")
    assert 0.9e9 < plan["parameters"] < 1.1e9 and plan["devices"] == 4
    assert plan["state_bytes"]["total"] == pytest.approx(plan["zero_expected_bytes"]["total"], rel=0.05)
    memory = plan["memory"]
    assert memory["hbm_bytes"] == 16 * 2**30 and not memory["fits"] and memory["shortfall_bytes"] > 0
    assert "temporaries need" in memory["compiler"]


@pytest.mark.aot_gpu
def test_plan_1b_for_eight_h100_fits():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    plan = run_plan(*ONE_B, "--target", "h100:1x1x8")
    _common_checks(plan, devices=8, zero_stage=3)
    assert plan["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert plan["memory"]["fits"] and plan["memory"]["shortfall_bytes"] == 0


def test_unknown_target_and_missing_extra_are_one_line_errors(subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "llmx.plan", "--config",
                           "configs/tiny.yaml", "--target", "tpu9:1x1"], cwd=REPO, env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --target 'tpu9:1x1' is not")


def test_a_target_without_its_extra_names_the_extra(subprocess_env):
    # libtpu is made unimportable in the child, so this runs whether or not this interpreter has the extra.
    without_libtpu = ("import runpy, sys; sys.modules['libtpu'] = None; "
                      "sys.argv = ['llmx.plan', '--config', 'configs/tiny.yaml', '--target', 'v5e:2x2']; "
                      "runpy.run_module('llmx.plan', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", without_libtpu], cwd=REPO, env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --target v5e:2x2 needs the tpu extra: pip install -e '.[tpu]'"
