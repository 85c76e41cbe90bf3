"""Fused optimizer kernels in Pallas (issue 4): AdamW, SGD with momentum, LAMB.

Each module declares its optimizer once (`factory.Rules`: hyper-parameters, kernel and jnp leaf
rules, transformation); `factory.make` builds two optax factories from it with the signature of
the optax function of the same name: `adamw` etc. run the Pallas kernel (`block_sizes=`,
`interpret=`), `adamw_reference` etc. the same update in plain jnp. Both take `master_weights=`
and `mesh=` / `param_specs=` for the ZeRO-sharded path and return updates for
`optax.apply_updates`. The references are what `llmx.optim` trains with on CPU, where Pallas
only interprets; on TPU and GPU it compiles the kernels.
"""

from pallas_kernels.adamw import ADAMW, AdamWState, adamw, adamw_reference
from pallas_kernels.blocking import BlockSizes
from pallas_kernels.factory import Rules, make
from pallas_kernels.lamb import LAMB, LambState, lamb, lamb_reference
from pallas_kernels.sgd import SGD, SgdState, sgd, sgd_reference

__all__ = [
    "ADAMW",
    "LAMB",
    "SGD",
    "AdamWState",
    "BlockSizes",
    "LambState",
    "Rules",
    "SgdState",
    "adamw",
    "adamw_reference",
    "lamb",
    "lamb_reference",
    "make",
    "sgd",
    "sgd_reference",
]
