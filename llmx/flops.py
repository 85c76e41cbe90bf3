"""Model FLOPs utilisation (MFU, PaLM §B): the FLOPs a training step needs by the model's arithmetic
(its family's `flops_per_token`, `llmx.models`), over what the devices could do at their bf16 peak:
the vendors' data sheets for accelerators, the measured matmul probe (`llmx.matmul`) for CPUs.
"""

from __future__ import annotations

from llmx import matmul, models
from llmx.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (TPU: per chip).
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token of `cfg`'s model family at `cfg.seq_len`."""
    return models.get(cfg.family).flops_per_token(cfg)


def peak_flops(devices) -> float:
    """Total bf16 peak of `devices`: the data-sheet figure per accelerator, the measured CPU peak for
    CPU devices (simulated CPU devices share one machine, so their peak is the machine's)."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        return matmul.cpu_peak_flops()
    kind = devices[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    raise KeyError(f"no peak FLOP/s known for device kind {kind!r}; add it to llmx.flops.PEAK_BF16_FLOPS")


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """The fraction of `peak` FLOP/s that `tokens_per_second` tokens of `flops_per_token` each use."""
    return tokens_per_second * flops_per_token / peak
