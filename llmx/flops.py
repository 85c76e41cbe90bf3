"""Model FLOPs utilisation (MFU, PaLM §B): the FLOPs a training step needs by the model's arithmetic
(its family's `flops_per_token`, `llmx.models`), over what the devices could do at their bf16 peak:
the vendors' data sheets for accelerators, the measured matmul probe (`llmx.matmul`) for CPUs, or
`train.peak_flops_per_device` where the device is in neither (MFU is then left out, not guessed).
"""

from __future__ import annotations

import re

from llmx import matmul, models
from llmx.config import ModelConfig

# Dense (not 2:4-sparse) bf16 peak FLOP/s per device from the vendors' data sheets (TPU: per chip);
# fp16 where the device has no bf16 (T4, V100). Matched in this order against `device.device_kind`
# (e.g. "Tesla T4", "NVIDIA H100 PCIe", "TPU v5 lite", "AMD Instinct MI300X"), so a variant precedes
# the name it contains ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    # Google Cloud TPU system architecture pages, per chip.
    (r"TPU v2", 45e12),
    (r"TPU v3", 123e12),
    (r"TPU v4", 275e12),
    (r"TPU v5 ?(lite|e)", 197e12),  # v5e reports "TPU v5 lite"
    (r"TPU v5p?", 459e12),  # v5p reports "TPU v5"
    (r"TPU v6 ?(lite|e)", 918e12),  # v6e (Trillium)
    # NVIDIA data sheets: the tensor-core figure without sparsity (half the headline one).
    (r"\bT4\b", 65e12),  # fp16
    (r"\bV100", 125e12),  # fp16, SXM2
    (r"\bL4\b", 121e12),
    (r"\bL40S\b", 362e12),
    (r"\bA100", 312e12),
    (r"\bA10G?\b", 125e12),  # A10; AWS's A10G is sold as the same part
    (r"\bH100 PCIe", 756e12),
    (r"\bH100 NVL", 835e12),
    (r"\bH100|\bH800|\bGH200", 989e12),
    (r"\bH200", 989e12),
    (r"\bB200", 2250e12),
    # AMD Instinct data sheets (dense bf16 matrix).
    (r"\bMI250X", 383e12),
    (r"\bMI250", 362e12),
    (r"\bMI300A", 981e12),
    (r"\bMI300X?|\bMI325X", 1307e12),
)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token of `cfg`'s model family at `cfg.seq_len`."""
    return models.get(cfg.family).flops_per_token(cfg)


def data_sheet_peak(device_kind: str) -> float | None:
    """The table's bf16 peak of one device of this kind, or None for a kind it does not list."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return flops
    return None


def peak_flops(devices, *, per_device: float = 0.0) -> float | None:
    """Total bf16 peak of `devices`: `per_device` (train.peak_flops_per_device) if given, else the
    data-sheet figure per accelerator, the measured CPU peak for CPU devices (simulated CPU devices
    share one machine, so their peak is the machine's); None where none is known."""
    devices = list(devices)
    if per_device > 0:
        return per_device * len(devices)
    if devices[0].platform == "cpu":
        return matmul.cpu_peak_flops()
    flops = data_sheet_peak(devices[0].device_kind)
    return None if flops is None else flops * len(devices)


def unknown_peak_warning(devices) -> str:
    """The one line a run prints when `peak_flops` knows no figure for its devices."""
    kind = list(devices)[0].device_kind
    return (f"no bf16 peak FLOP/s known for device kind {kind!r}: MFU is not reported; set "
            "train.peak_flops_per_device to the data sheet's figure to report it")


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """The fraction of `peak` FLOP/s that `tokens_per_second` tokens of `flops_per_token` each use."""
    return tokens_per_second * flops_per_token / peak
