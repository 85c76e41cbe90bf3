"""Model families by `model.family`: each is one module that owns its Flax module, its FLOPs per token and
its Hugging Face name mapping (`family.Family`); the layers they share live in `layers`.

Adding a family: its module (exposing `FAMILY`), one entry below, its name in `ModelConfig.family`'s
choices (a test keeps the two equal) and whatever config fields it adds.
"""

from __future__ import annotations

from llmx.errors import ConfigError
from llmx.models import llama, mixtral
from llmx.models.family import Family, HFMapping, HFTensors

__all__ = ["FAMILIES", "Family", "HFMapping", "HFTensors", "for_hf_model_type", "get"]

FAMILIES: dict[str, Family] = {family.name: family for family in (llama.FAMILY, mixtral.FAMILY)}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; llmx has: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_hf_model_type(model_type) -> Family:
    """The family that reads Hugging Face checkpoints whose `config.json` says `model_type`."""
    for family in FAMILIES.values():
        if family.hf is not None and family.hf.model_type == model_type:
            return family
    readable = ", ".join(repr(f.hf.model_type) for f in FAMILIES.values() if f.hf is not None)
    raise ConfigError(f"Hugging Face config model_type={model_type!r} is not supported; llmx reads {readable}")
