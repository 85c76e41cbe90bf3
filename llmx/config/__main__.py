"""`python -m llmx.config from-deepspeed ds_config.json [--config model.yaml] [--devices N] [section.key=value ...]`

Prints the llmx YAML equivalent to a DeepSpeed ds_config (on top of an llmx config, with overrides),
a comment on every value that came from DeepSpeed; warnings go to stderr. The batch sizes depend on
the number of devices (DeepSpeed's rule uses the data-parallel size): `--devices`, default this host's.
"""

from __future__ import annotations

import argparse
import sys

import jax

from llmx import deepspeed
from llmx.cli import run as run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.config", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["from-deepspeed"], help="print the llmx YAML for a DeepSpeed ds_config.json")
    parser.add_argument("ds_config", help="DeepSpeed JSON config")
    parser.add_argument("--config", help="llmx YAML config the ds_config goes on top of (default: llmx's defaults)")
    parser.add_argument("--devices", type=int, default=None, help="devices the run will use (default: this host's)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, applied last")
    args = parser.parse_intermixed_args(argv)
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be at least 1")
    ds = deepspeed.read(args.ds_config)
    n_devices = args.devices or jax.device_count()
    cfg, translation = deepspeed.load(args.config, ds, args.overrides, n_devices=n_devices)
    for warning in ds.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(deepspeed.to_yaml(cfg, translation, ds_path=args.ds_config, overrides=args.overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
