"""llmx: DeepSpeed's ideas (ZeRO, fused optimizers, mixed precision) rebuilt natively on JAX/XLA."""

import os

# XLA/TSL C++ logs below warnings are noise for users; this must be set before jax is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# `python -m llmx.train` (and evaluate, generate) re-executes itself once with huge pages for XLA:CPU's
# buffers before anything else is imported (llmx/hugepages.py says why); a plain `import llmx` does not.
from llmx import hugepages as _hugepages  # noqa: E402

_hugepages.reexec_entry_point()
