"""PNG plots of one or more runs: loss and eval loss, learning rate, tokens/s and MFU.

    python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out metrics.png]
"""

import argparse
from pathlib import Path

from llmx.plot import plot_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("metrics.png"))
    args = parser.parse_args()
    drawn = plot_runs(args.run_dirs, args.out)
    print(f"{args.out}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
