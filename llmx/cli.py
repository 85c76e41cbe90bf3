"""What every `python -m llmx.X` entry point shares: quiet library logs, and user errors printed as one
line with exit status 2 instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

from llmx.errors import LlmxError


def _quiet_libraries() -> None:
    for name in ("absl", "orbax", "tensorflow_datasets", "jax._src.xla_bridge", "grain", "lm_eval", "datasets", "gcsfs"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def absl_errors_only():
    """Libraries warn through absl about choices llmx makes deliberately (Orbax: a handler override, a
    read-only manager's save interval; TFDS: a variant folder without dataset_info.json before a first
    build). Those are not the user's business and would break a failed command's one-line error."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def run(main: Callable[[], int]) -> int:
    """Runs an entry point; a LlmxError becomes `error: <message>` on stderr and exit status 2."""
    _quiet_libraries()
    try:
        return main()
    except LlmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
