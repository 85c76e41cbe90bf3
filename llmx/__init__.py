"""llmx: DeepSpeed's ideas (ZeRO, fused optimizers, mixed precision) rebuilt natively on JAX/XLA."""

import os

# XLA/TSL C++ logs below warnings are noise for users; this must be set before jax is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
