"""Tokens/s and per-device memory of each parallel layout, side by side in one run.

    python scripts/bench_parallel.py [--config configs/tiny.yaml] [--steps 5] [--only NAME,NAME] [--json] [key=value ...]

Runs on 8 simulated CPU devices unless real devices are present (set XLA_FLAGS yourself to change).
The global batch is the same for every layout (micro_batch_size is scaled by the data-parallel size and,
for pipelined layouts, by the micro-batches streamed through the stages), so a sequence-parallel layout
holds the same tokens in fewer, longer-split rows per replica.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402

from llmx import axes  # noqa: E402
from llmx import config as config_lib  # noqa: E402
from llmx import mesh as mesh_lib  # noqa: E402
from llmx.benchmark import measure_train_step  # noqa: E402

# name -> mesh overrides (None: one device). Pipelined layouts stream grad_accum_steps = stages
# micro-batches (the global batch stays the same: micro_batch_size shrinks with it).
LAYOUTS = {
    "1 device": None,
    "data=8": {"data": 8},
    "fsdp=8 zero1": {"fsdp": 8, "zero_stage": 1},
    "fsdp=8 zero2": {"fsdp": 8, "zero_stage": 2},
    "fsdp=8 zero3": {"fsdp": 8, "zero_stage": 3},
    "fsdp=4 tensor=2 zero3": {"fsdp": 4, "tensor": 2, "zero_stage": 3},
    "data=2 fsdp=2 tensor=2 zero2": {"data": 2, "fsdp": 2, "tensor": 2, "zero_stage": 2},
    "tensor=8": {"tensor": 8},
    "pipeline=2 fsdp=4 zero3": {"pipeline": 2, "fsdp": 4, "zero_stage": 3},
    "pipeline=4 fsdp=2 zero3": {"pipeline": 4, "fsdp": 2, "zero_stage": 3},
    "pipeline=2 tensor=2 fsdp=2 zero3": {"pipeline": 2, "tensor": 2, "fsdp": 2, "zero_stage": 3},
    "pipeline=2 repeats=2 fsdp=4 zero3": {"pipeline": 2, "pipeline_repeats": 2, "fsdp": 4, "zero_stage": 3},
    "sequence=4 fsdp=2 all_gather zero3": {"sequence": 4, "fsdp": 2, "zero_stage": 3, "sequence_strategy": "all_gather"},
    "sequence=4 fsdp=2 ulysses zero3": {"sequence": 4, "fsdp": 2, "zero_stage": 3, "sequence_strategy": "ulysses"},
    "sequence=4 fsdp=2 ring zero3": {"sequence": 4, "fsdp": 2, "zero_stage": 3, "sequence_strategy": "ring"},
    "sequence=4 fsdp=2 ring in order": {"sequence": 4, "fsdp": 2, "zero_stage": 3, "sequence_strategy": "ring",
                                        "sequence_load_balance": False},
    "sequence=8 ring zero3": {"sequence": 8, "zero_stage": 3, "sequence_strategy": "ring"},
    "sequence=2 tensor=2 fsdp=2 zero3": {"sequence": 2, "tensor": 2, "fsdp": 2, "zero_stage": 3},
}
SIZES = ("pipeline", "data", "fsdp", "sequence", "tensor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--only", default="", metavar="NAME,NAME",
                        help="run only the layouts whose name contains one of these (e.g. '1 device,sequence')")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    n = len(jax.devices())
    for name, layout in LAYOUTS.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        layout = {"data": 1, **(layout or {})}
        sizes = {axis: layout.get(axis, 1) for axis in SIZES}
        devices = jax.devices()[:1] if name == "1 device" else None
        if devices is None and math.prod(sizes.values()) != n:
            continue
        accum = sizes["pipeline"]  # one micro-batch per stage (the fewest a pipeline takes)
        micro = max(1, args.global_batch // (sizes["data"] * sizes["fsdp"] * accum))
        overrides = [f"mesh.{key}={value}" for key, value in layout.items()]
        cfg = config_lib.load(args.config, [*args.overrides, *overrides, f"train.micro_batch_size={micro}",
                                            f"train.grad_accum_steps={accum}"])
        results[name] = measure_train_step(cfg, devices=devices, steps=args.steps)
        results[name].pop("step_times")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'layout':<36}{'tokens/s':>10}{'step ms':>10}{'state MiB/dev':>15}{'temp MiB/dev':>14}{'compile s':>11}")
    for name, r in results.items():
        print(f"{name:<36}{r['tokens_per_second']:>10.0f}{r['step_time'] * 1e3:>10.1f}"
              f"{r['state_bytes_per_device'] / 2**20:>15.2f}{r['temp_bytes_per_device'] / 2**20:>14.2f}"
              f"{r['compile_seconds']:>11.1f}")
    print(f"(median of {args.steps} steps after 2 warmup steps; {n} {jax.devices()[0].platform} devices)")


if __name__ == "__main__":
    main()
