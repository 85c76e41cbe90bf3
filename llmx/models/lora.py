"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen projection
W plus a trainable low-rank update, y = x W + (alpha / r) (x A) B, with A (in..., r) and B (r, out...).

The seam: a layer builds its projections and calls `attach(self, cfg, rngs, {name: input dims})`, which
adds an `Adapter` as `<name>_lora` beside each projection `model.lora_targets` names (nothing when
`model.lora_rank` is 0), and applies a projection through `project(self, name, equation, x)`. Whether a
projection has an adapter is decided when the model is built, never inside the step. Built inside the
layer stack's `nnx.vmap`, every adapter is stacked on the `layers` axis like its projection, and its
logical axes are the projection's (the rank axis is never split), so ZeRO stages and tensor
parallelism shard it the way they shard W.

Training keeps W frozen: `partition` splits the parameters into (trainable adapters, frozen rest); the
train step differentiates and updates only the first, so neither gradients nor optimizer state exist
for the base (`llmx.step`). `merged` folds the adapters into W for a plain exported model.
As in PEFT: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, so training starts from the base model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.config import ModelConfig
from llmx.errors import ConfigError
from llmx.matmul import einsum

SUFFIX = "_lora"


class Adapter(nnx.Module):
    """A (in..., r) and B (r, out...) of one projection, and the scale alpha / r."""

    def __init__(self, weight: nnx.Param, *, n_in: int, rank: int, alpha: float, rngs: nnx.Rngs):
        shape, dtype = weight[...].shape, weight[...].dtype
        axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * len(shape))
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))

        def uniform(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        a_init = nnx.with_partitioning(uniform, (*axes[:n_in], None))
        self.a = nnx.Param(a_init(rngs.params(), (*in_shape, rank), dtype))  # (in..., r)
        self.b = nnx.Param(jnp.zeros((rank, *out_shape), dtype), out_sharding=(None, *axes[n_in:]))  # (r, out...)
        self.scale = alpha / rank

    def __call__(self, equation: str, x):
        """The update (alpha / r) (x A) B for the projection `equation` ('x,w->y') of x; fp32."""
        x_sub, rest = equation.split(",")
        w_sub, y_sub = rest.split("->")
        r = next(c for c in "rzyxwvu" if c not in equation)  # a free letter for the rank
        in_sub = "".join(c for c in w_sub if c in x_sub)
        out_sub = "".join(c for c in w_sub if c not in x_sub)
        kept = "".join(c for c in x_sub if c not in in_sub)
        xa = einsum(f"{x_sub},{in_sub}{r}->{kept}{r}", x, self.a[...]).astype(x.dtype)  # (..., r)
        return self.scale * einsum(f"{kept}{r},{r}{out_sub}->{y_sub}", xa, self.b[...])


def attach(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, projections: dict[str, int]) -> None:
    """Adds `<name>_lora` to `module` for each of its projections ({name: number of input dims of the
    weight}) that model.lora_targets names; nothing when model.lora_rank is 0."""
    if not cfg.lora_rank:
        return
    for name, n_in in projections.items():
        if name in cfg.lora_target_names:
            adapter = Adapter(getattr(module, name), n_in=n_in, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rngs=rngs)
            setattr(module, name + SUFFIX, adapter)


def project(module: nnx.Module, name: str, equation: str, x):
    """x through the projection `name` of `module` (fp32 out), plus its adapter's update if it has one."""
    y = einsum(equation, x, getattr(module, name)[...])
    adapter = getattr(module, name + SUFFIX, None)  # present or not since the model was built
    return y if adapter is None else y + adapter(equation, x)


def is_adapter(path, _value=None) -> bool:
    """An nnx filter: the parameters under an adapter."""
    return any(str(getattr(k, "key", k)).endswith(SUFFIX) for k in path)


@dataclasses.dataclass(frozen=True)
class Partition:
    """How the train step splits the parameters: `split(params) -> (trainable, frozen)` and its inverse
    `merge(trainable, frozen)`. Without LoRA everything is trainable and `frozen` is None."""

    split: Callable[[Any], tuple[Any, Any]]
    merge: Callable[[Any, Any], Any]
    frozen_base: bool


def partition(cfg: ModelConfig) -> Partition:
    if not cfg.lora_rank:
        return Partition(split=lambda params: (params, None), merge=lambda trainable, _: trainable, frozen_base=False)
    return Partition(split=lambda params: params.split(is_adapter, ...),
                     merge=lambda trainable, frozen: nnx.merge_state(frozen, trainable), frozen_base=True)


def check_targets(params, cfg: ModelConfig) -> None:
    """Every projection of model.lora_targets got an adapter (a family without it is a ConfigError)."""
    if not cfg.lora_rank:
        return
    names = {str(getattr(k, "key", k)) for path, _ in nnx.to_flat_state(params) for k in path}
    missing = [t for t in cfg.lora_target_names if t + SUFFIX not in names]
    if missing:
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r}: model.family={cfg.family} has no projection "
                          f"{', '.join(map(repr, missing))}")


def merged(params: dict, cfg: ModelConfig) -> dict:
    """A nested dict of parameters (`nnx.to_pure_dict`) with every adapter folded into its projection,
    W + (alpha / r) A B, and removed: the plain model (numpy, W's dtype)."""
    def fold(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if name.endswith(SUFFIX):
                continue
            if isinstance(value, dict):
                out[name] = fold(value)
            elif name + SUFFIX in tree:
                w = np.asarray(value, np.float32)  # (L, in..., out...)
                a = np.asarray(tree[name + SUFFIX]["a"], np.float32)  # (L, in..., r)
                b = np.asarray(tree[name + SUFFIX]["b"], np.float32)  # (L, r, out...)
                L, r = a.shape[0], a.shape[-1]
                delta = np.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(w.shape)  # (L, in, out)
                out[name] = (w + cfg.lora_alpha / cfg.lora_rank * delta).astype(np.asarray(value).dtype)
            else:
                out[name] = value
        return out

    return fold(params)


def trainable_count(params) -> tuple[int, int]:
    """(trainable parameters, all parameters) under LoRA's rule: adapters only when there are any."""
    leaves = nnx.to_flat_state(params)
    total = sum(int(np.prod(v.shape)) for _, v in leaves)
    adapters = sum(int(np.prod(v.shape)) for path, v in leaves if is_adapter(path))
    return (adapters or total), total
