"""Time one optimizer step: fused Pallas path vs the optax chain vs the jnp reference, side by side.

    python scripts/bench_optimizer.py --params 10_000_000 --optimizer adamw --steps 5 [--json out.json]

Each path runs `update` + `optax.apply_updates` jitted with the params and state
donated, so outputs can reuse their buffers. Reported per path: median seconds per
step and the effective bandwidth, i.e. the bytes an ideal fused step must move (read
param, grad and optimizer state once, write param and state once) divided by that
time, next to the machine's copy bandwidth measured in the same run (a donated
in-place `x + 1`, which reads and writes every byte once).

On CPU the Pallas path runs in interpret mode (a loop of dynamic slices), so it
loses to XLA's fused jnp there by design; the script says so and still runs.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pallas_kernels  # noqa: E402
from pallas_kernels.blocking import resolve_interpret  # noqa: E402

LEAF_COLUMNS = 1024  # leaves are (rows, 1024): lane-dense, like transformer weights


def make_tree(num_params: int, dtype, seed: int) -> dict:
    """Four leaves of ~num_params/4 elements each (rows rounded to a multiple of 8)."""
    rows = max(8, (num_params // 4 // LEAF_COLUMNS) // 8 * 8)
    keys = jax.random.split(jax.random.key(seed), 4)
    return {f"w{i}": jax.random.normal(key, (rows, LEAF_COLUMNS), dtype) for i, key in enumerate(keys)}


def ideal_bytes_per_element(optimizer: str, dtype) -> int:
    """Bytes per parameter an ideal one-pass step moves: read param, grad, state; write param, state."""
    param = jnp.dtype(dtype).itemsize
    state = {"adamw": 2, "lamb": 2, "sgd": 1}[optimizer] * 4 + (4 if param < 4 else 0)  # moments (+ fp32 master)
    return 2 * param + param + 2 * state  # param read+write, grad read, state read+write


def transformations(optimizer: str, lr: float, interpret: bool | None) -> dict:
    if optimizer == "adamw":
        return {
            "pallas": pallas_kernels.adamw(lr, interpret=interpret),
            "optax": optax.adamw(lr),
            "jnp_reference": pallas_kernels.adamw_reference(lr),
        }
    if optimizer == "lamb":
        return {
            "pallas": pallas_kernels.lamb(lr, interpret=interpret),
            "optax": optax.lamb(lr),
            "jnp_reference": pallas_kernels.lamb_reference(lr),
        }
    return {
        "pallas": pallas_kernels.sgd(lr, 0.9, interpret=interpret),
        "optax": optax.sgd(lr, 0.9),
        "jnp_reference": pallas_kernels.sgd_reference(lr, 0.9),
    }


def median_seconds(fn, carry, steps: int) -> float:
    """Median seconds of `carry = fn(*carry)` over `steps` calls, after one warm-up (compile) call."""
    carry = jax.block_until_ready(fn(*carry))
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        carry = jax.block_until_ready(fn(*carry))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def copy_bandwidth(num_bytes: int, steps: int) -> float:
    """Bytes/s of a donated in-place `x + 1` over `num_bytes` (every byte read once and written once)."""
    add_one = jax.jit(lambda x: (x + 1.0,), donate_argnums=0)
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    return 2 * x.nbytes / median_seconds(add_one, (x,), steps)


def bench_path(tx, params, grads, steps: int) -> float:
    """Median seconds of one jitted update + apply_updates with params and state donated."""

    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)  # donation consumes the buffers; keep the caller's
    return median_seconds(jax.jit(step, donate_argnums=(0, 1)), (params, state), steps)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument("--optimizer", choices=["adamw", "sgd", "lamb"], default="adamw")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (median reported)")
    parser.add_argument("--interpret", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    params = make_tree(args.params, dtype, seed=0)
    grads = make_tree(args.params, dtype, seed=1)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    interpret = {"auto": None, "yes": True, "no": False}[args.interpret]
    step_bytes = num_params * ideal_bytes_per_element(args.optimizer, dtype)
    copy = copy_bandwidth(num_params * 4, args.steps)

    backend = jax.default_backend()
    print(f"{args.optimizer} {args.dtype}, {num_params:,} params on {backend} ({jax.devices()[0].device_kind})")
    print(f"ideal step traffic {step_bytes / 1e9:.3f} GB; copy bandwidth {copy / 1e9:.1f} GB/s (donated x + 1)")
    interpreted = resolve_interpret(interpret)
    if interpreted:
        print("note: Pallas runs in interpret mode here (no CPU lowering), so the pallas path is expected to lose;")
        print("      on CPU train with the *_reference (XLA-fused jnp) path")
    if dtype != jnp.float32:
        print("note: optax keeps low-precision state and no master copy, so it moves fewer bytes than counted")
    results = {}
    for name, tx in transformations(args.optimizer, 1e-3, interpret).items():
        seconds = bench_path(tx, params, grads, args.steps)
        bandwidth = step_bytes / seconds
        results[name] = {
            "seconds_per_step": seconds,
            "bytes_per_second": bandwidth,
            "fraction_of_copy": bandwidth / copy,
        }
        print(
            f"  {name:14s} {seconds * 1e3:10.2f} ms/step  {bandwidth / 1e9:8.2f} GB/s  {bandwidth / copy:6.1%} of copy"
        )
    report = {
        "optimizer": args.optimizer,
        "dtype": args.dtype,
        "num_params": num_params,
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "pallas_interpreted": interpreted,
        "steps": args.steps,
        "ideal_bytes_per_step": step_bytes,
        "copy_bytes_per_second": copy,
        "paths": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
