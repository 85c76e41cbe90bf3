"""`python -m llmx.sweep --config configs/sweep_tiny.yaml [key=value ...]`: a hyper-parameter search
(`--mode hyper`, the default) or a search for the fastest parallel layout (`--mode system`).

Every check of the input (the sweep section, each parameter's path and bounds, the device split, the
backend's extra) runs before the sweep directory is made, so a bad command leaves nothing behind.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
from pathlib import Path

from llmx.errors import ConfigError
from llmx.sweep import devices as devices_lib
from llmx.sweep import results, spec as spec_lib, system
from llmx.sweep.backends import LocalBackend, RayBackend, import_ray
from llmx.sweep.study import Driver, open_study

log = logging.getLogger("llmx.sweep")


def _lock(sweep_dir: Path):
    """One sweep process per directory: a second would start the same interrupted trials again."""
    handle = open(sweep_dir / "sweep.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another sweep is running in {sweep_dir}; wait for it or use another sweep.dir") from None
    return handle


def hyper_search(config: str | None, overrides: list[str]) -> dict:
    """Runs (or continues) the study; returns the report of `results.report` plus the sweep directory."""
    base, spec, name = spec_lib.load(config, overrides)
    spec_lib.check_hyper(spec)
    devices = devices_lib.detect(spec.platform)
    per_trial = devices_lib.subset_size(devices, parallel=spec.parallel, per_trial=spec.devices_per_trial)
    if spec.backend == "ray":
        import_ray()
        slots = devices_lib.slot_environments(devices, parallel=1, per_trial=per_trial) if devices.platform == "cpu" else [{}]
    else:
        slots = devices_lib.slot_environments(devices, parallel=spec.parallel, per_trial=spec.devices_per_trial)
    sweep_dir = Path(spec.dir or f"sweeps/{name}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(sweep_dir)
    study = open_study(spec, base, sweep_dir, name)
    log.info("sweep %s: %d trials (%s sampler, %s pruner), %d at once on %s with %d %s device(s) each; study in %s",
             name, spec.n_trials, spec.sampler, spec.pruner, spec.parallel, spec.backend, per_trial,
             devices.platform, sweep_dir / "study.db")
    if spec.backend == "ray":
        backend = RayBackend(devices=devices, per_trial=per_trial, parallel=spec.parallel, address=spec.ray_address,
                             env_overlay=slots[0])
    else:
        backend = LocalBackend(slots)
    try:
        interrupted_by = Driver(study, spec, base, sweep_dir, backend).run()
    finally:
        backend.close()
    out = results.report(study, spec, base, sweep_dir, name)
    lock.close()
    return {**out, "dir": sweep_dir, "interrupted_by": interrupted_by}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config with a sweep: section (see configs/sweep_tiny.yaml)")
    parser.add_argument("--mode", choices=("hyper", "system"), default="hyper",
                        help="hyper: search sweep.space; system: the fastest zero stage x micro batch x remat x mesh")
    parser.add_argument("--target", default="current",
                        help="--mode system: current (these devices) or a plan target (v5e:2x2, h100:1x1x8, ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value and sweep.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if args.mode == "system":
        out = system.autotune(args.config, args.overrides, target=args.target)
        print(out["table"])
        print(f"fastest: {out['best_label']} -> {out['best']}" if out["best"] else "no candidate fits")
        return 0
    out = hyper_search(args.config, args.overrides)
    print(out["table"])
    if out["interrupted_by"]:
        print(f"interrupted ({out['interrupted_by']}): rerun the same command to continue the sweep in {out['dir']}")
    elif out["best"] is not None:
        t = out["best_trial"]
        print(f"best: trial {t.number}, value {t.value:.4f} -> {out['best']} "
              f"(python -m llmx.train --config {out['best']})")
    return 0
