"""llmx against PyTorch on this CPU, the same Llama trained the same way: `python scripts/bench_vs_torch.py
[--config configs/bench_cpu.yaml] [--sizes] [--rounds 3] [--json out.json] [--plot out.png] [key=value ...]`.

Sides: llmx (`jax.jit` of the real train step), PyTorch eager and `torch.compile` (Hugging Face's
`LlamaForCausalLM` built from `llmx.hf.hf_config`, holding llmx's initial weights through
`llmx.hf.params_to_hf`), each in fp32 and bf16 (llmx `train.precision=bf16`: fp32 master weights, bf16
compute; PyTorch: fp32 weights under `torch.autocast(bfloat16)`). Both train on the same token batch
with AdamW of the same hyper-parameters and global-norm clipping, so the first losses agree (printed).

Every measurement is its own worker process (`--worker`), so peak memory (the worker's VmHWM) and start-up
(from the worker's spawn to its first step done: imports, build, compile, first step) are its own; the
parent alternates the sides within each round so this machine's drift hits all of them, and reports
medians over rounds. Each round also measures llmx.matmul's bf16 matmul probe in a worker, and MFU is
over the median probe (model FLOPs from llmx.flops, both sides credited the same FLOPs per token).

`--sizes` sweeps width, depth and sequence length around the bench model (the table the README shows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmx import hugepages  # noqa: E402  (no jax: the parent imports nothing heavy)

SIDES = ("llmx", "torch_eager", "torch_compile")
PRECISIONS = ("fp32", "bf16")
# (label, overrides): width, depth and sequence length grown one at a time from the bench model.
SIZES = (
    ("d256 L4 T256", ["model.d_model=256", "model.d_ff=688", "model.n_heads=4", "model.n_kv_heads=4"]),
    ("d512 L4 T256", ["model.d_model=512", "model.d_ff=1376", "model.n_heads=8", "model.n_kv_heads=8"]),
    ("d1024 L4 T256", ["model.d_model=1024", "model.d_ff=2752", "model.n_heads=16", "model.n_kv_heads=16",
                       "train.micro_batch_size=4"]),
    ("d256 L8 T256", ["model.n_layers=8"]),
    ("d256 L4 T1024", ["model.seq_len=1024", "train.micro_batch_size=2"]),
    ("d256 L4 T2048", ["model.seq_len=2048", "train.micro_batch_size=1"]),
)


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- workers


def _llmx_worker(cfg, *, steps: int, warmup: int, spawned: float) -> dict:
    import jax

    from llmx import mesh as mesh_lib
    from llmx.benchmark import synthetic_batch
    from llmx.step import build_steps

    mesh = mesh_lib.make_mesh(cfg.mesh)
    built = build_steps(cfg, mesh)
    state, batch = built.init(), synthetic_batch(cfg, mesh)
    t0 = time.perf_counter()
    compiled = built.train.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i == 0:
            first_step_done = time.time()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    return {"times": times, "losses": losses, "compile_seconds": compile_seconds,
            "startup_seconds": first_step_done - spawned, "tokens_per_step": int(batch["inputs"].size)}


def _torch_worker(cfg, *, compiled: bool, steps: int, warmup: int, spawned: float) -> dict:
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx import hf
    from llmx import mesh as mesh_lib
    from llmx.benchmark import synthetic_batch
    from llmx.step import build_steps

    # llmx's initial weights and batch (built on the host, nothing compiled but the init).
    mesh = mesh_lib.make_mesh(cfg.mesh)
    built = build_steps(cfg, mesh)
    params = jax.device_get(built.init().params)
    host = {k: np.asarray(v) for k, v in synthetic_batch(cfg, mesh).items()}
    del built
    hf_cfg = hf.hf_config(cfg.model)
    hf_cfg.update(dtype="float32")
    model = LlamaForCausalLM(LlamaConfig.from_dict(hf_cfg, attn_implementation="sdpa"))
    weights = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf.params_to_hf(params, cfg.model).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise SystemExit(f"weights do not map: missing {missing}, unexpected {unexpected}")
    model.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)  # torch's fastest CPU AdamW
    inputs = torch.from_numpy(host["inputs"].reshape(-1, host["inputs"].shape[-1]).astype(np.int64))
    targets = torch.from_numpy(host["targets"].reshape(-1, host["targets"].shape[-1]).astype(np.int64))
    bf16 = cfg.train.precision == "bf16"

    def loss_fn(x, y):  # (B, T) -> mean next-token cross-entropy, in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    forward = torch.compile(loss_fn) if compiled else loss_fn
    losses, times, compile_seconds = [], [], 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward(inputs, targets)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        value = float(loss)
        elapsed = time.perf_counter() - t0
        if i == 0:
            first_step_done, compile_seconds = time.time(), elapsed  # the first call traces and compiles
        if i >= warmup:
            times.append(elapsed)
        losses.append(value)
    return {"times": times, "losses": losses, "compile_seconds": compile_seconds,
            "startup_seconds": first_step_done - spawned, "tokens_per_step": int(inputs.numel()),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _probe_worker() -> dict:
    from llmx.matmul import measure_cpu_peak

    return measure_cpu_peak(repeats=3)


def worker(args) -> int:
    spawned = float(os.environ["LLMX_BENCH_SPAWNED"])
    if args.worker == "probe":
        out = _probe_worker()
    else:
        from llmx import config as config_lib

        cfg = config_lib.load(args.config, args.overrides)
        if args.worker == "llmx":
            out = _llmx_worker(cfg, steps=args.steps, warmup=args.warmup, spawned=spawned)
        else:
            out = _torch_worker(cfg, compiled=args.worker == "torch_compile", steps=args.steps, warmup=args.warmup,
                                spawned=spawned)
    out["peak_rss_bytes"] = _peak_rss_bytes()
    print("RESULT " + json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------- parent


def spawn(kind: str, config: str | None, overrides: list[str], *, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--steps", str(steps),
           "--warmup", str(warmup)]
    if config:
        cmd += ["--config", config]
    # The llmx worker runs as `python -m llmx.train` does: with huge pages for XLA:CPU's buffers.
    env = hugepages.environment() if kind == "llmx" and hugepages.wanted() else dict(os.environ)
    env["LLMX_BENCH_SPAWNED"] = repr(time.time())
    proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: the {kind} worker failed ({' '.join(overrides)}): {tail}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(config, overrides, *, sides, precisions, rounds, steps, warmup, log) -> dict:
    """{'probe': [...], (side, precision): [worker results, one per round]}, alternated within rounds."""
    from llmx.flops import flops_per_token
    from llmx import config as config_lib

    runs = {(s, p): [] for s in sides for p in precisions}
    probes = []
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # neither side always goes first
        for side, precision in order:
            result = spawn(side, config, [*overrides, f"train.precision={precision}"], steps=steps, warmup=warmup)
            runs[side, precision].append(result)
            log(f"  round {r + 1} {side:14s} {precision}: {result['tokens_per_step'] / statistics.median(result['times']):8.0f} tokens/s")
        probes.append(spawn("probe", None, [], steps=0, warmup=0))
    peak = statistics.median(p["flops"] for p in probes)
    fpt = flops_per_token(config_lib.load(config, overrides).model)
    table = {}
    for (side, precision), results in runs.items():
        tps = [x["tokens_per_step"] / statistics.median(x["times"]) for x in results]
        table[f"{side}/{precision}"] = {
            "tokens_per_second": statistics.median(tps),
            "step_seconds": statistics.median(statistics.median(x["times"]) for x in results),
            "mfu": statistics.median(tps) * fpt / peak,
            "peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in results),
            "startup_seconds": statistics.median(x["startup_seconds"] for x in results),
            "compile_seconds": statistics.median(x["compile_seconds"] for x in results),
            "first_losses": results[0]["losses"][:3],
            "rounds": tps,
        }
    for precision in precisions:
        ours = table.get(f"llmx/{precision}")
        theirs = [table[f"{s}/{precision}"] for s in sides if s != "llmx" and f"{s}/{precision}" in table]
        if ours and theirs:
            best = max(theirs, key=lambda t: t["tokens_per_second"])
            table[f"ratio/{precision}"] = {
                "vs_best_torch": ours["tokens_per_second"] / best["tokens_per_second"],
                "rss_vs_best_torch": ours["peak_rss_bytes"] / best["peak_rss_bytes"],
            }
    table["peak_flops"] = peak
    table["flops_per_token"] = fpt
    return table


def _cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _print_table(label: str, table: dict, sides, precisions) -> None:
    print(f"{label}: bf16 matmul peak {table['peak_flops'] / 1e9:.0f} GFLOP/s")
    for precision in precisions:
        for side in sides:
            t = table[f"{side}/{precision}"]
            print(f"  {side:14s} {precision}: {t['tokens_per_second']:8.0f} tokens/s  step {t['step_seconds'] * 1e3:7.1f} ms"
                  f"  MFU {t['mfu']:6.1%}  peak RSS {t['peak_rss_bytes'] / 2**20:6.0f} MiB  start-up "
                  f"{t['startup_seconds']:5.1f} s  first losses {', '.join(f'{x:.3f}' for x in t['first_losses'])}")
        if f"ratio/{precision}" in table:
            r = table[f"ratio/{precision}"]
            print(f"  llmx / fastest PyTorch, {precision}: speed {r['vs_best_torch']:.2f}x, peak RSS {r['rss_vs_best_torch']:.2f}x")


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["sizes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in [k for k in results["sizes"][labels[0]] if "/" in k and not k.startswith("ratio")]:
        ax.plot(labels, [results["sizes"][lbl][key]["tokens_per_second"] for lbl in labels], marker="o", label=key)
    ax.set_ylabel("tokens/s (median)")
    ax.set_yscale("log")
    ax.set_title(f"train step, {results['cpu']}")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "bench_cpu.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker")
    # Untimed steps first: the first compiles (torch.compile) or runs the compiled step for the first time.
    # llmx's steps 1-4 also ran up to ~35 % slower than its steady state in fresh processes (Zen 4 VM): the
    # kernel spends longer on the step's huge-page faults (~163 per step as later, sys 35-85 ms in those steps
    # against 12-25 after), while PyTorch is steady from step 2. A training run's throughput is the steady state.
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first compiles)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--sizes", action="store_true", help="sweep width, depth and sequence length")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="with --sizes: a PNG of tokens/s against size")
    parser.add_argument("--worker", choices=(*SIDES, "probe"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    for flag, value, least in (("--rounds", args.rounds, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise SystemExit(f"error: {flag} {value}: expected an integer >= {least}")
    sides = args.sides.split(",")
    precisions = args.precisions.split(",")
    for name in sides:
        if name not in SIDES:
            raise SystemExit(f"error: --sides {name}: expected some of {', '.join(SIDES)}")
    for name in precisions:
        if name not in PRECISIONS:
            raise SystemExit(f"error: --precisions {name}: expected some of {', '.join(PRECISIONS)}")
    results = {"cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps": args.steps}
    sizes = SIZES if args.sizes else (("bench model", []),)
    results["sizes"] = {}
    for label, extra in sizes:
        print(f"{label} ...", file=sys.stderr)
        table = measure(args.config, [*extra, *args.overrides], sides=sides, precisions=precisions,
                        rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                        log=lambda line: print(line, file=sys.stderr))
        results["sizes"][label] = table
        _print_table(f"{label} ({results['cpu']})", table, sides, precisions)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot and args.sizes:
        _plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
