"""What a model family provides to the rest of llmx: its module, its FLOPs arithmetic and its Hugging
Face name mapping. `llmx.models.FAMILIES` holds one `Family` per value of `model.family`.

The module `build` returns is what the trainer, the evaluator and the generator call (`llmx.step`,
`llmx.generate`), so every family's module has:
  - `__call__(tokens (B, T) int, segment_ids=None, positions=None) -> logits (B, T, V) fp32`;
  - `init_cache(batch_size, max_len) -> cache` and `decode(tokens (B, T), cache, *, segment_ids, positions,
    index) -> (logits (B, T, V), cache)` for KV-cached generation (any pytree as the cache);
  - parameters under logical axis names (`llmx.mesh` rules), layers stacked on a leading `layers` axis.
A family whose forward has more to say than logits (a mixture of experts' load-balancing and router
losses) sows those values as `nnx.Intermediate`s at the model's top level (a per-layer value leaves the
layer stack as a `run_layers` output), so the forward's signature and its callers stay as they are; its
`auxiliary` turns them into a penalty that `llmx.step` adds to the loss, and metrics (Llama has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from flax import nnx

from llmx.config import ModelConfig
from llmx.errors import CheckpointError


class HFTensors:
    """A Hugging Face checkpoint's tensors by name, handed to a family's `params_from_hf`: `take` checks
    the shape and remembers the name, so whatever no family took is reported (`llmx.hf`)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self._tensors = tensors
        self._taken: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._tensors:
            raise CheckpointError(f"the Hugging Face checkpoint has no tensor {name}")
        if tuple(self._tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(self._tensors[name].shape)}; the config implies {shape}")
        self._taken.add(name)
        return self._tensors[name]

    def has(self, name: str) -> bool:
        return name in self._tensors

    def skip(self, name: str) -> None:
        """A tensor the family knowingly leaves unread (a tied checkpoint's copy of the embedding)."""
        self._taken.add(name)

    def untaken(self) -> list[str]:
        return sorted(n for n in self._tensors if n not in self._taken)


@dataclasses.dataclass(frozen=True)
class HFMapping:
    """How a family reads and writes Hugging Face `config.json` + `*.safetensors`. `llmx.hf` picks the
    family by `config.json`'s `model_type` on import and writes `model_type`, `architectures`, the dtype
    and the special token ids itself."""

    model_type: str  # config.json's model_type, read and written
    architectures: tuple[str, ...]  # written to config.json (transformers' class to load)
    # HF config.json dict -> the ModelConfig fields of the architecture (no family, no dtypes); any HF
    # option the family does not implement is a ConfigError naming the field
    config_from_hf: Callable[[dict], dict[str, Any]]
    # ModelConfig -> config.json's architecture fields
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    # (checkpoint tensors, cfg) -> the nested dict of parameters, as `nnx.to_pure_dict` gives
    params_from_hf: Callable[[HFTensors, ModelConfig], dict]
    # (nested dict of numpy parameters, cfg) -> HF tensor name -> array
    params_to_hf: Callable[[dict, ModelConfig], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # model.family
    build: Callable[..., nnx.Module]  # build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> the module (see above)
    # Weights that take part in a matmul per token (a mixture of experts: the active experts' only)
    matmul_params: Callable[[ModelConfig], int]
    # Training FLOPs (forward + backward) per token at cfg.seq_len, for MFU and the plan
    flops_per_token: Callable[[ModelConfig], float]
    hf: HFMapping | None = None  # None: no Hugging Face import/export
    # The module's __call__ runs its layers through `layers.run_stack` with every per-row value in the
    # carry and has nothing else to return, so a pipelined mesh can split the stack into stages.
    pipelines: bool = False
    # model (after a forward) -> (penalty added to the mean loss, {metric: value}); None: nothing to add
    auxiliary: Callable[[nnx.Module], tuple[Any, dict]] | None = None
