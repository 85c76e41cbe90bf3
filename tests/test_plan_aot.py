"""`llmx.plan --target`: the real train step of a 1B-parameter config AOT-compiled for a TPU v5e slice
and an 8 x H100 host on this CPU machine, with memory against the device's HBM."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO
from helpers import AOT_PYTHON, needs_extra

from llmx import config as config_lib
from llmx import plan as plan_lib
from llmx.mesh import make_mesh

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


# A small bf16 model with model.attention=auto and the fused Pallas AdamW: what a plan compiles must be
# what the target would run (its attention kernel, compiled Pallas), not what the CPU host would.
SMALL_AOT = ["model.vocab_size=512", "model.d_model=512", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.d_ff=1024", "model.seq_len=512", "train.micro_batch_size=2", "train.precision=bf16",
             "model.attention=auto", "optim.impl=pallas", "mesh.data=1", "mesh.fsdp=-1", "mesh.zero_stage=3"]
PARAM_ARRAYS = 12  # embedding, final norm, output; 9 stacked arrays of the scanned layers: one AdamW call each


@pytest.mark.aot_tpu
def test_plan_for_v5e_compiles_splash_and_mosaic_optimizer_kernels():
    needs_extra("libtpu", "tpu")
    plan = run_plan(*SMALL_AOT, "--target", "v5e:2x2")
    assert plan["kernels"] == {"attention": "splash (model.attention=auto)",
                               "optimizer": "Pallas adamw kernel (Mosaic, compiled)"}
    # Mosaic calls: splash's forward and its two backward kernels (dq, dkv) in the scanned layer, and
    # one compiled (not interpreted: an interpreted kernel is plain HLO) AdamW kernel per parameter array.
    assert plan["custom_calls"]["tpu_custom_call"] == 3 + PARAM_ARRAYS


@pytest.mark.aot_gpu
def test_plan_for_h100_compiles_cudnn_attention_and_triton_optimizer_kernels():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    plan = run_plan(*SMALL_AOT, "--target", "h100:1x1x8")
    assert plan["kernels"] == {"attention": "cudnn (model.attention=auto)",
                               "optimizer": "Pallas adamw kernel (Triton, compiled)"}
    calls = plan["custom_calls"]
    assert calls["__cudnn$fmhaScaleBiasSoftmax"] == 1 and calls["__cudnn$fmhaScaleBiasSoftmaxBackward"] == 1
    assert calls["__gpu$xla.gpu.triton"] == PARAM_ARRAYS


def test_plan_names_the_kernels_it_used_on_cpu():
    """On CPU meshes: on one device the cpu flash kernel where its probe beat XLA attention, XLA attention
    on several; the Pallas optimizer's jnp reference (Pallas only interprets)."""
    from llmx.attention import cpu

    cfg = config_lib.load(None, ["optim.impl=pallas"])
    one_device = "cpu" if cpu.faster_than_xla(cfg.model.dtype) else "xla"
    optimizer = "jnp reference of the Pallas adamw kernel (Pallas only interprets on cpu)"
    assert plan_lib.kernels(cfg, make_mesh(cfg.mesh, jax.devices()[:1])) == {
        "attention": f"{one_device} (model.attention=auto)", "optimizer": optimizer}
    assert plan_lib.kernels(cfg, make_mesh(cfg.mesh, jax.devices()[:8])) == {
        "attention": "xla (model.attention=auto)", "optimizer": optimizer}


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


# A small bf16 mixtral (8 experts, top-2): the MoE train step as the target would run it.
MOE_AOT = ["model.family=mixtral", "model.vocab_size=512", "model.d_model=256", "model.n_layers=2", "model.n_heads=4",
           "model.n_kv_heads=2", "model.moe_d_ff=512", "model.seq_len=256", "model.n_experts=8",
           "train.micro_batch_size=2", "train.precision=bf16", "mesh.data=1", "mesh.zero_stage=3"]


@pytest.mark.aot_tpu
def test_moe_step_for_v5e_compiles_the_megablox_grouped_matmul():
    needs_extra("libtpu", "tpu")
    plan = run_plan(*MOE_AOT, "mesh.expert=2", "mesh.fsdp=2", "--target", "v5e:2x2")
    assert plan["kernels"]["experts"] == "megablox (model.moe_impl=auto)"
    # Mosaic calls in the scanned layer: splash's 3, and megablox's gmm for each of the 3 expert projections
    # forward, a gmm and a tgmm for each backward
    assert plan["custom_calls"]["tpu_custom_call"] == 3 + 3 * 3
    # dropless expert parallelism: the routed rows out and back, forward and backward
    assert plan["collectives"]["ragged-all-to-all"] >= 4 and plan["memory"]["fits"]


@pytest.mark.aot_gpu
def test_moe_step_for_eight_h100_exchanges_tokens_by_all_to_all():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    plan = run_plan(*MOE_AOT, "mesh.expert=4", "mesh.fsdp=2", "model.moe_capacity_factor=1.25", "--target", "h100:1x1x8")
    assert plan["kernels"]["experts"] == "dense (model.moe_impl=auto)"
    assert plan["collectives"]["all-to-all"] >= 4  # dispatch and return, forward and backward, in the scanned layer
    assert plan["state_bytes"]["total"] == pytest.approx(plan["zero_expected_bytes"]["total"], rel=0.02)
    dropless = run_plan(*MOE_AOT, "mesh.expert=4", "mesh.fsdp=2", "--target", "h100:1x1x8")
    assert dropless["kernels"]["experts"] == "ragged (model.moe_impl=auto)"
    assert dropless["collectives"]["ragged-all-to-all"] >= 4  # (the GPU compiler adds all-to-alls of the offsets)
