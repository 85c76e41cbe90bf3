"""Fused optimizer kernels in Pallas (issue 4): AdamW, SGD with momentum, LAMB.

Each is an `optax.GradientTransformation` with the signature of the optax function
of the same name, plus `master_weights=`, `block_sizes=`, `interpret=`, and
`mesh=` / `param_specs=` for the ZeRO-sharded path. Each returns updates for
`optax.apply_updates`. The `*_reference` twins are the same transformations in
plain jnp (the fast path on CPU, where Pallas only interprets).
"""

from pallas_kernels.adamw import AdamWState, adamw, adamw_reference
from pallas_kernels.blocking import BlockSizes
from pallas_kernels.lamb import LambState, lamb, lamb_reference
from pallas_kernels.sgd import SgdState, sgd, sgd_reference

__all__ = [
    "AdamWState",
    "BlockSizes",
    "LambState",
    "SgdState",
    "adamw",
    "adamw_reference",
    "lamb",
    "lamb_reference",
    "sgd",
    "sgd_reference",
]
