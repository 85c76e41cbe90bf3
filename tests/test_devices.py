"""Unknown accelerators train: the peak table, train.peak_flops_per_device, MFU left out with one warning."""

import logging
import types

import pytest
from helpers import read_metrics, small_config

from llmx import flops, train as train_mod
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
