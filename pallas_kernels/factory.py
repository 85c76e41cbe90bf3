"""One factory for every fused optimizer here: the Pallas kernel or its plain-jnp reference as optax.

Each optimizer module declares its `Rules` once: its hyper-parameters with optax's names, order
and defaults; the leaf rule around its Pallas kernel and the same leaf rule in jnp; and the
transformation that maps a leaf rule over a pytree (state, schedules, master weights, shard_map).
`make(rules, impl)` turns them into a function with the signature of the optax function of the same
name (`pallas_kernels.adamw(learning_rate, b1, b2, ...)` like `optax.adamw`), plus the keyword-only
`master_weights=`, `mesh=` / `param_specs=`, and for the kernel `block_sizes=` / `interpret=`.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from pallas_kernels import blocking
from pallas_kernels.blocking import BlockSizes

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]

IMPLS = ("pallas", "reference")
_KEYWORD_DEFAULTS = {"master_weights": True, "mesh": None, "param_specs": None}
_KERNEL_DEFAULTS = {"block_sizes": None, "interpret": None}

_PALLAS_DOC = """Fused {title} in Pallas, a drop-in for `optax.{name}`: same arguments and numerics, {fp32_state} in fp32.

Returns updates (new_param - param) for `optax.apply_updates`. Low-precision leaves keep an fp32
master copy in the state unless `master_weights=False` (`pallas_kernels.leafwise`). `interpret=None`
interprets where Pallas has no lowering (CPU) and compiles on GPU (Triton) / TPU (Mosaic), judged by
the platform of `mesh` (else the default backend); `block_sizes=None` takes that platform's default.
With `mesh` and `param_specs` (one PartitionSpec per leaf: how the optimizer state is split) the
update runs under `jax.shard_map`, each device updating its own shard (`pallas_kernels.sharded`).
"""
_REFERENCE_DOC = """`{name}` in plain jnp: the same arguments, state, master weights, sharding and numerics, no Pallas.

XLA fuses it; `llmx.optim` trains with it on CPU, where Pallas would only interpret the kernel.
"""


@dataclasses.dataclass(frozen=True)
class Rules:
    """What one fused optimizer is made of; `make` builds its optax factories from it."""

    name: str  # the optax function it stands in for
    title: str  # for the docstring, e.g. "AdamW (Loshchilov & Hutter 2019)"
    fp32_state: str  # what it keeps in fp32 besides master weights, for the docstring
    defaults: dict[str, Any]  # optax's hyper-parameters after learning_rate, in optax's positional order
    leaf_args: tuple[str, ...]  # the hyper-parameters the leaf rules take as keywords
    transformation_args: tuple[str, ...]  # those the transformation takes as keywords
    # kernel(*leaves, hyper=, **leaf_args, block_sizes=, interpret=) and reference(*leaves, hyper=, **leaf_args):
    # one leaf's update (the same outputs from both).
    kernel: Callable[..., tuple]
    reference: Callable[..., tuple]
    # transformation(leaf_update, *, learning_rate, master_weights, mesh, param_specs, **transformation_args)
    transformation: Callable[..., optax.GradientTransformation]


def _signature(rules: Rules, impl: str) -> inspect.Signature:
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    keywords = _KEYWORD_DEFAULTS | (_KERNEL_DEFAULTS if impl == "pallas" else {})
    return inspect.Signature(
        [inspect.Parameter("learning_rate", positional, annotation=ScalarOrSchedule)]
        + [inspect.Parameter(name, positional, default=value) for name, value in rules.defaults.items()]
        + [inspect.Parameter(name, keyword, default=value) for name, value in keywords.items()],
        return_annotation=optax.GradientTransformation,
    )


def _leaf_update(rules: Rules, impl: str, arguments: dict) -> Callable[..., tuple]:
    hyperparameters = {name: arguments[name] for name in rules.leaf_args}
    if impl == "reference":
        return functools.partial(rules.reference, **hyperparameters)
    mesh = arguments["mesh"]
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    interpret = blocking.resolve_interpret(arguments["interpret"], platform=platform)
    block_sizes = arguments["block_sizes"] or BlockSizes.get_default(interpret=interpret, platform=platform)
    return functools.partial(rules.kernel, **hyperparameters, block_sizes=block_sizes, interpret=interpret)


def make(rules: Rules, impl: str) -> Callable[..., optax.GradientTransformation]:
    """The optax-style factory of `rules` with `impl="pallas"` (the kernel) or `"reference"` (plain jnp)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; use one of {IMPLS}")
    signature = _signature(rules, impl)

    def factory(*args, **kwargs) -> optax.GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        return rules.transformation(
            _leaf_update(rules, impl, arguments),
            learning_rate=arguments["learning_rate"],
            master_weights=arguments["master_weights"],
            mesh=arguments["mesh"],
            param_specs=arguments["param_specs"],
            **{name: arguments[name] for name in rules.transformation_args},
        )

    factory.__name__ = factory.__qualname__ = rules.name if impl == "pallas" else f"{rules.name}_reference"
    factory.__module__ = rules.kernel.__module__
    factory.__signature__ = signature
    doc = _PALLAS_DOC if impl == "pallas" else _REFERENCE_DOC
    factory.__doc__ = doc.format(title=rules.title, name=rules.name, fp32_state=rules.fp32_state)
    return factory
