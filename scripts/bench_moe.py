"""A mixture of experts against a dense model with the same active parameters, on the same tokens.

    python scripts/bench_moe.py [--steps 300] [--out runs/bench_moe] [--json]

Trains configs/tiny.yaml (dense SwiGLU, d_ff 688) and configs/moe_tiny.yaml (8 experts of width 344, top-2:
a token meets the same 688 hidden units, from a pool of 2752) with the same data, seed, batch and steps, so
both see exactly the same token stream, then reports side by side: parameters (total and active per token),
final validation loss (`llmx.evaluate`'s batches, at the last step), training tokens/s (median of the
logged intervals after the first), and the MoE's router metrics at the end. Runs one after the other on
this machine's devices; on a shared CPU, rerun and compare ratios rather than absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from llmx import config as config_lib  # noqa: E402
from llmx import models  # noqa: E402
from llmx.train import train  # noqa: E402

MODELS = {"dense (tiny)": "configs/tiny.yaml", "moe (moe_tiny)": "configs/moe_tiny.yaml"}


def run_one(name: str, config: str, *, steps: int, out: Path) -> dict:
    run_dir = out / Path(config).stem
    cfg = config_lib.load(REPO / config, [f"train.steps={steps}", f"train.run_dir={run_dir}", "train.progress=false",
                                          "train.sample_tokens=0", f"train.eval_every={steps}", f"checkpoint.every={steps}"])
    summary = train(cfg)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["tokens_per_second"] for m in lines if "tokens_per_second" in m][1:]
    last = [m for m in lines if "loss" in m][-1]
    family = models.get(cfg.model.family)
    n_params = sum(x.size for x in jax.tree.leaves(summary.params))
    return {
        "model": name,
        "config": config,
        "parameters": int(n_params),
        "active_matmul_parameters": family.matmul_params(cfg.model),
        "steps": steps,
        "final_train_loss": last["loss"],
        "eval_loss": summary.final_eval_loss,
        "tokens_per_second": statistics.median(speeds) if speeds else None,
        "router": {k: last[k] for k in ("aux_loss", "z_loss", "dropped_fraction", "expert_load_max", "expert_load_mean")
                   if k in last},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/bench_moe")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = [run_one(name, config, steps=args.steps, out=Path(args.out)) for name, config in MODELS.items()]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'model':16} {'params':>9} {'active':>9} {'eval loss':>10} {'train loss':>10} {'tokens/s':>9}  router")
    for r in results:
        router = " ".join(f"{k}={v:.3g}" for k, v in r["router"].items())
        print(f"{r['model']:16} {r['parameters'] / 1e6:8.2f}M {r['active_matmul_parameters'] / 1e6:8.2f}M "
              f"{r['eval_loss']:10.4f} {r['final_train_loss']:10.4f} {r['tokens_per_second']:9.0f}  {router}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
