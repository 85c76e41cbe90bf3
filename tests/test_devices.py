"""Unknown accelerators train: the peak table, train.peak_flops_per_device, MFU left out with one warning."""

import json
import logging
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO
from helpers import read_metrics, small_config

from llmx import attention, flops
from llmx import mesh as mesh_lib
from llmx import train as train_mod
from llmx.config import MeshConfig
from llmx.train import train


def fake(kind: str, platform: str = "gpu"):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind, per_chip", [
    ("Tesla T4", 65e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 125e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA B200", 2250e12), ("TPU v2", 45e12), ("TPU v3", 123e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("AMD Instinct MI300X", 1307e12),
    ("AMD Instinct MI250X", 383e12),
])
def test_data_sheet_peaks(kind, per_chip):
    assert flops.peak_flops([fake(kind)] * 4) == 4 * per_chip


def test_unknown_device_peak_is_none_unless_given():
    assert flops.peak_flops([fake("Imaginary Accelerator 9000")]) is None
    assert flops.peak_flops([fake("Imaginary Accelerator 9000")] * 2, per_device=5e12) == 10e12


@pytest.mark.slow
def test_unknown_device_trains_without_mfu_then_with_the_given_peak(tmp_path, data_dir, monkeypatch, caplog):
    """The trainer on devices whose kind no table lists: it trains, leaves MFU out and says so once;
    with train.peak_flops_per_device it reports MFU against that figure."""
    unknown = fake("Imaginary Accelerator 9000")
    real = flops.peak_flops
    monkeypatch.setattr(train_mod, "peak_flops", lambda devices, *, per_device: real(
        [unknown] * len(list(devices)), per_device=per_device))
    monkeypatch.setattr(train_mod, "unknown_peak_warning", lambda devices: flops.unknown_peak_warning([unknown]))
    with caplog.at_level(logging.WARNING, logger="llmx"):
        train(small_config(tmp_path / "a", data_dir, "train.steps=2"))
    warnings = [r.getMessage() for r in caplog.records if "peak FLOP/s" in r.getMessage()]
    assert len(warnings) == 1 and "Imaginary Accelerator 9000" in warnings[0]
    assert "train.peak_flops_per_device" in warnings[0]
    steps = [m for m in read_metrics(tmp_path / "a" / "run") if "loss" in m]
    assert len(steps) == 2 and all("mfu" not in m and m["tokens_per_second"] > 0 for m in steps)

    cfg = small_config(tmp_path / "b", data_dir, "train.steps=2", "train.peak_flops_per_device=1e9")
    train(cfg)
    n = 8  # the simulated CPU devices of tests/conftest.py
    for m in [m for m in read_metrics(tmp_path / "b" / "run") if "loss" in m]:
        expected = m["tokens_per_second"] * flops.flops_per_token(cfg.model) / (1e9 * n)
        assert m["mfu"] == pytest.approx(expected, rel=1e-9)


def _fused_vs_xla_attention(name: str) -> tuple[float, float]:
    """Largest |difference| of outputs and of q/k/v gradients, `name` against XLA, bf16, two documents."""
    b, t, h, k, d = 2, 512, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (b, t, n, d), jnp.bfloat16) for key, n in zip(keys, (h, k, k)))
    segments = (jnp.arange(t) >= t // 3).astype(jnp.int32)[None].repeat(b, 0)  # (B, T): two documents

    def outputs(impl):
        fn = attention.ATTENTION[impl]
        with mesh_lib.activation_sharding(mesh_lib.make_mesh(MeshConfig(data=1), jax.devices()[:1])):
            out = jax.jit(lambda *a: fn(*a, segments))(q, kk, v)
            grads = jax.jit(jax.grad(lambda *a: fn(*a, segments).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, kk, v)
        return out.astype(jnp.float32), grads

    (out, grads), (ref, ref_grads) = outputs(name), outputs("xla")
    grad_diff = max(float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max()) for g, r in zip(grads, ref_grads))
    return float(jnp.abs(out - ref).max()), grad_diff


@pytest.mark.gpu
def test_cudnn_attention_equals_xla_on_a_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU: scripts/device_check.py runs this on a lent one")
    out_diff, grad_diff = _fused_vs_xla_attention("cudnn")
    assert out_diff < 0.05 and grad_diff < 0.5  # bf16: one ulp at |x| ~ 4 is 2**-5; a wrong mask is O(1)


@pytest.mark.tpu
def test_splash_attention_equals_xla_on_a_tpu():
    if jax.default_backend() != "tpu":
        pytest.skip("needs a TPU: scripts/device_check.py runs this on a lent one")
    out_diff, grad_diff = _fused_vs_xla_attention("splash")
    assert out_diff < 0.05 and grad_diff < 0.5


@pytest.mark.slow
def test_device_check_dry_run_prints_its_summary(subprocess_env, tmp_path):
    """scripts/device_check.py --dry on CPU (so the script a lent device runs cannot rot): one JSON summary."""
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "scripts/device_check.py", "--dry", "--json", str(tmp_path / "s.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] and summary["dry"] and summary["platform"] == "cpu" and summary["local_devices"] == 2
    assert summary["tests"]["collected"] == 2  # the gpu- and tpu-marked tests of this file
    assert summary["adamw"]["fraction_of_copy"] > 0 and summary["adamw"]["kernel"] == "jnp reference"
    for run in (summary["mfu"]["one_device"], summary["mfu"]["all_devices_fsdp"]):
        assert run["tokens_per_second"] > 0 and 0 < run["mfu"] < 1
    assert summary["mfu"]["all_devices_fsdp"]["devices"] == 2
    assert summary["attention"]["max_abs_diff_out"] == 0.0 and summary["attention"]["kernel"] == "xla"
