"""Model FLOPs and MFU (model FLOPs utilisation, PaLM §B): the FLOPs a training step needs by the
model's arithmetic, over what the devices could do at their bf16 peak.

Per token of training, 6 FLOPs per matmul weight (forward 2, backward 4; the embedding lookup is no
matmul, the output projection is) plus attention's two T x T matmuls. PaLM (Chowdhery et al. 2022,
App. B) counts attention as 12·L·H·Dh·T per token; with causal masking half of it is needed, and like
MaxText we count that half: 6·L·H·Dh·T. Rematerialisation is not counted (it is not model FLOPs).
"""

from __future__ import annotations

from llmx.config import ModelConfig
from llmx import matmul

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


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention and MLP projections and the output."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
    return cfg.n_layers * per_layer + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `cfg.seq_len`."""
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len
    return 6 * matmul_params(cfg) + attention


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


def mfu(tokens_per_second: float, cfg: ModelConfig, peak: float) -> float:
    return tokens_per_second * flops_per_token(cfg) / peak
