"""The sequence parallelism attention runs under while the model is traced: set around the step
functions by `llmx.step` (decided and checked by `llmx.sequence.resolve`), read by `llmx.attention.kernel`."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    strategy: str  # all_gather | ulysses | ring
    axis: str  # the mesh axis every sequence is split over
    size: int  # devices on it
    balanced: bool  # tokens arrive in the dual-chunk-swap order of `llmx.sequence.token_order`


_ACTIVE: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar("llmx_sequence", default=None)


@contextlib.contextmanager
def sequence_parallel(parallel: SequenceParallel | None):
    """While tracing under this context, attention runs `parallel`'s strategy (None: no sequence split)."""
    token = _ACTIVE.set(parallel)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> SequenceParallel | None:
    return _ACTIVE.get()
