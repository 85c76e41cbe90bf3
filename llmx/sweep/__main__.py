"""`python -m llmx.sweep`: see llmx/sweep/command.py."""

import importlib.util
import sys

if importlib.util.find_spec("optuna") is None:
    print("error: python -m llmx.sweep needs the sweep extra: pip install -e '.[sweep]'", file=sys.stderr)
    raise SystemExit(2)

from llmx.cli import run as run_cli  # noqa: E402
from llmx.sweep.command import main  # noqa: E402

raise SystemExit(run_cli(main))
