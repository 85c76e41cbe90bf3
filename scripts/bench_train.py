"""Train-step throughput, fp32 and bf16 side by side: `python scripts/bench_train.py --config X [key=value ...] [--json]`.

Builds and compiles the real train step once per precision, then alternates timed blocks of steps
between them (this machine's speed drifts, so only alternated medians compare) and reports the
median tokens/s, step time, compile time, MFU (llmx.flops: model FLOPs over the bf16 peak) and XLA's
memory analysis of the compiled step.

On CPU the peak is measured in the same run: every round also times llmx.matmul's bf16 matmul probe (a
2048^3 bf16 x bf16 -> fp32 matmul, the faster of XLA:CPU's bf16 dot and an fp32 dot of the upcast
operands), and MFU is over the median of those. The cached probe the trainer's logs use was measured
at another moment, and this machine's speed drifts by up to 30 % within minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmx import hugepages  # noqa: E402

hugepages.reexec()  # before jax: huge pages for XLA:CPU's buffers, as `python -m llmx.train` has them

import jax  # noqa: E402

from llmx import config as config_lib  # noqa: E402
from llmx import mesh as mesh_lib  # noqa: E402
from llmx.benchmark import synthetic_batch  # noqa: E402
from llmx.flops import flops_per_token, mfu, peak_flops  # noqa: E402
from llmx.matmul import measure_cpu_peak  # noqa: E402
from llmx.step import build_steps  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def prepare(cfg):
    mesh = mesh_lib.make_mesh(cfg.mesh)
    steps = build_steps(cfg, mesh)
    state, batch = steps.init(), synthetic_batch(cfg, mesh)
    t0 = time.perf_counter()
    compiled = steps.train.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    state, metrics = compiled(state, batch)  # warm up
    jax.block_until_ready(metrics)
    return {"cfg": cfg, "mesh": mesh, "compiled": compiled, "state": state, "batch": batch,
            "compile_seconds": compile_seconds, "times": []}


def time_block(run: dict, steps: int) -> None:
    for _ in range(steps):
        t0 = time.perf_counter()
        run["state"], metrics = run["compiled"](run["state"], run["batch"])
        jax.block_until_ready(metrics)
        run["times"].append(time.perf_counter() - t0)
    run["loss"] = float(metrics["loss"])


def report(run: dict, peak: float) -> dict:
    cfg = run["cfg"]
    tokens = run["batch"]["inputs"].size
    step_time = statistics.median(run["times"])
    analysis = run["compiled"].memory_analysis()
    tokens_per_second = tokens / step_time
    return {
        "precision": cfg.train.precision,
        "dtype": cfg.model.dtype,
        "tokens_per_step": tokens,
        "step_time": step_time,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(tokens_per_second, flops_per_token(cfg.model), peak) if peak else float("nan"),
        "compile_seconds": run["compile_seconds"],
        "temp_bytes": analysis.temp_size_in_bytes,
        "peak_bytes": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes,
        "final_loss": run["loss"],
        "timed_steps": len(run["times"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of fp32 and bf16 blocks")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    runs = {}
    for precision in PRECISIONS:
        cfg = config_lib.load(args.config, [*args.overrides, f"train.precision={precision}"])
        runs[precision] = prepare(cfg)
    devices = list(runs["fp32"]["mesh"].devices.flat)
    on_cpu = devices[0].platform == "cpu"
    probes = []
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            time_block(runs[precision], args.steps)
        if on_cpu:
            probes.append(measure_cpu_peak(repeats=3))
    if on_cpu:
        peak = statistics.median(p["flops"] for p in probes)
        peak_source = "bf16 matmul probe, median of the rounds of this run"
    else:
        peak = peak_flops(devices, per_device=runs["fp32"]["cfg"].train.peak_flops_per_device)
        peak_source = "data sheet or train.peak_flops_per_device" if peak else "unknown device: no MFU"
    results = {p: report(r, peak) for p, r in runs.items()}
    results["bf16_speedup"] = results["bf16"]["tokens_per_second"] / results["fp32"]["tokens_per_second"]
    results["peak_flops"] = peak
    results["peak_source"] = peak_source
    if on_cpu:
        results["probe_bf16_dot_flops"] = statistics.median(p["native"] for p in probes)
        results["probe_upcast_fp32_dot_flops"] = statistics.median(p["upcast"] for p in probes)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        detail = ""
        if on_cpu:
            detail = (f" (bf16 dot {results['probe_bf16_dot_flops'] / 1e9:.0f}, fp32 dot of upcast operands "
                      f"{results['probe_upcast_fp32_dot_flops'] / 1e9:.0f})")
        print(f"peak {(peak or float('nan')) / 1e9:.0f} GFLOP/s{detail}, {peak_source}; bf16/fp32 speed {results['bf16_speedup']:.2f}x")
        for p in PRECISIONS:
            r = results[p]
            print(f"{p}: {r['tokens_per_second']:8.0f} tokens/s  step {r['step_time'] * 1e3:7.1f} ms  "
                  f"MFU {r['mfu']:6.1%}  compile {r['compile_seconds']:5.1f} s  temp {r['temp_bytes'] / 2**20:7.1f} MiB  "
                  f"peak {r['peak_bytes'] / 2**20:7.1f} MiB  loss {r['final_loss']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
