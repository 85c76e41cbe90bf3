"""TPE with ASHA pruning against a grid search: an LR x warmup search on configs/tiny.yaml.

    python scripts/bench_sweep.py                 # both searches, then the comparison (and --json)

The grid tries every (optim.lr, optim.warmup_steps) pair for the full run; TPE samples the same box
(log-uniform LR, integer warmup) and ASHA stops the trials that are behind at each rung. The claim
checked: TPE+ASHA's best final eval loss is within 1 % of the grid's best, using at most 40 % of the
grid's trial-steps (the steps every trial ran, pruned ones up to where they were stopped). Losses and
step counts, not seconds, so a busy machine does not change the verdict. Each search keeps its study in
--out, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from pathlib import Path

from llmx.sweep.command import hyper_search

GRID_LR = [1e-3, 2e-3, 4e-3, 8e-3]
GRID_WARMUP = [0, 5, 10, 15]


def trial_steps(sweep_dir: Path) -> tuple[int, float | None, int]:
    """(steps run by all trials, best final metric of a complete trial, number of trials) from results.csv."""
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    complete = [float(r["final_eval_loss"]) for r in rows if r["state"] == "COMPLETE"]
    return sum(int(r["steps"] or 0) for r in rows), (min(complete) if complete else None), len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sweeps/bench", help="the two sweep directories go here")
    parser.add_argument("--steps", type=int, default=80, help="train.steps of every trial")
    parser.add_argument("--eval-every", type=int, default=20,
                        help="evaluations; ASHA's rungs fall on them (the first after the longest warmup)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--tpe-trials", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=2,
                        help="trials at once, one simulated CPU device each (overlaps their start-up)")
    parser.add_argument("--only", choices=("grid", "tpe_asha"),
                        help="run one search (e.g. both at once in two processes); the comparison reads the other's results.csv")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # CPU devices to split between parallel trials; set before anything reads it (the sweep does)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.parallel}"
    out = Path(args.out)
    run = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.sample_tokens=0",
           f"train.micro_batch_size={args.micro_batch_size}", "train.log_every=5", f"checkpoint.every={args.steps}",
           f"sweep.parallel={args.parallel}"]
    searches = {
        "grid": ["sweep.sampler=grid", "sweep.pruner=none", f"sweep.space.optim.lr={{grid: {GRID_LR}}}",
                 f"sweep.space.optim.warmup_steps={{grid: {GRID_WARMUP}}}"],
        "tpe_asha": ["sweep.sampler=tpe", "sweep.pruner=asha", f"sweep.trials={args.tpe_trials}",
                     f"sweep.space.optim.lr={{log_uniform: [{GRID_LR[0]}, {GRID_LR[-1]}]}}",
                     f"sweep.space.optim.warmup_steps={{int: [{GRID_WARMUP[0]}, {GRID_WARMUP[-1]}]}}"],
    }
    result = {"steps_per_trial": args.steps, "eval_every": args.eval_every, "micro_batch_size": args.micro_batch_size}
    for name, overrides in searches.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            hyper_search("configs/tiny.yaml", [*run, *overrides, f"sweep.dir={out / name}"])
            result[name] = {"wall_seconds": round(time.perf_counter() - t0, 1)}
    for name in searches:
        if not (out / name / "results.csv").is_file():
            print(f"{name}: no results in {out / name} yet")
            return 1
        steps, best, trials = trial_steps(out / name)
        result.setdefault(name, {"wall_seconds": None}).update(trials=trials, trial_steps=steps, best_eval_loss=best)
    grid, tpe = result["grid"], result["tpe_asha"]
    result["loss_ratio"] = tpe["best_eval_loss"] / grid["best_eval_loss"]
    result["steps_ratio"] = tpe["trial_steps"] / grid["trial_steps"]
    result["claim_holds"] = result["loss_ratio"] <= 1.01 and result["steps_ratio"] <= 0.40
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in searches:
            r = result[name]
            wall = f"  ({r['wall_seconds']:.0f} s)" if r["wall_seconds"] is not None else ""
            print(f"{name:9s} {r['trials']:3d} trials  {r['trial_steps']:5d} trial-steps  best eval loss "
                  f"{r['best_eval_loss']:.4f}{wall}")
        print(f"TPE+ASHA / grid: eval loss {result['loss_ratio']:.4f}x, trial-steps {result['steps_ratio']:.1%} "
              f"-> {'holds' if result['claim_holds'] else 'does NOT hold'} (<= 1.01x with <= 40 %)")
    return 0 if result["claim_holds"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
