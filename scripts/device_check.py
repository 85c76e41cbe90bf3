"""The one check to run on a lent GPU or TPU machine (a few minutes); prints one JSON summary.

    python scripts/device_check.py [--json out.json]        # on the accelerator
    python scripts/device_check.py --dry                      # CPU, tiny sizes (CI runs this: it cannot rot)

What it measures, each a key of the summary:
- `tests`: `pytest -m "gpu or tpu"` (the tests that need a real device): passed / failed / skipped counts
  (`--dry`: only collected, from tests/test_devices.py).
- `adamw`: the compiled Pallas AdamW update (`pallas_kernels.adamw`) on ~`--adamw-params` fp32
  parameters: seconds per step and its ideal traffic (read param, grad, two moments; write param and
  moments) per second as a fraction of a donated device copy measured in the same run
  (scripts/bench_optimizer.py). `--dry`: the jnp reference (Pallas only interprets on CPU).
- `mfu`: a bf16 train step of the ~1B Llama (configs/llama_1b_v5e8.yaml, `--seq-len`,
  `--micro-batch`) on one device and on every local device with FSDP (ZeRO-3): tokens/s and MFU
  against the data-sheet peak (`llmx.flops`). `--dry`: a tiny model.
- `attention`: the device's fused kernel (cuDNN on GPU, splash on TPU; `--dry`: XLA) against XLA's
  einsum attention on the same bf16 inputs: the largest absolute difference of the outputs and of
  the gradients of q, k, v (a sum of the output as the loss).
Every section that fails records {"error": "..."} and the others still run; the exit status is 1 if
any failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels  # noqa: E402
from bench_optimizer import bench_path, copy_bandwidth, ideal_bytes_per_element, make_tree  # noqa: E402
from llmx import attention as attention_lib  # noqa: E402
from llmx import config as config_lib  # noqa: E402
from llmx import mesh as mesh_lib  # noqa: E402
from llmx.benchmark import synthetic_batch  # noqa: E402
from llmx.flops import flops_per_token, mfu, peak_flops  # noqa: E402
from llmx.step import build_steps  # noqa: E402

TINY = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.seq_len=64"]


def run_tests(dry: bool) -> dict:
    """The gpu/tpu-marked tests in a child pytest: counts from its summary line."""
    # --dry: only collected, from the file that holds them (collecting the whole suite takes minutes on CPU).
    where = ["tests/test_devices.py", "--collect-only"] if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tpu", *where]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    if collected := re.search(r"(\d+)(?:/\d+)? tests? collected", tail):
        counts["collected"] = int(collected.group(1))
    # pytest's status 5 is "no tests collected/selected": not a failure of the device.
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": tail, **counts,
            "ok": proc.returncode in (0, 5)}


def adamw_bandwidth(num_params: int, steps: int, dry: bool) -> dict:
    params = make_tree(num_params, jnp.float32, seed=0)
    grads = make_tree(num_params, jnp.float32, seed=1)
    n = sum(x.size for x in jax.tree.leaves(params))
    step_bytes = n * ideal_bytes_per_element("adamw", jnp.float32)
    copy = copy_bandwidth(n * 4, steps)
    tx = pallas_kernels.adamw_reference(1e-3) if dry else pallas_kernels.adamw(1e-3, interpret=False)
    seconds = bench_path(tx, params, grads, steps)
    return {"kernel": "jnp reference" if dry else "pallas (compiled)", "params": n, "seconds_per_step": seconds,
            "bytes_per_second": step_bytes / seconds, "copy_bytes_per_second": copy,
            "fraction_of_copy": step_bytes / seconds / copy, "ok": True}


def train_step_mfu(overrides: list[str], devices, steps: int) -> dict:
    cfg = config_lib.load(None if overrides[:1] == ["tiny"] else str(REPO / "configs" / "llama_1b_v5e8.yaml"),
                          [o for o in overrides if o != "tiny"])
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    built = build_steps(cfg, mesh)
    state, batch = built.init(), synthetic_batch(cfg, mesh)
    t0 = time.perf_counter()
    compiled = built.train.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens_per_second = batch["inputs"].size / step_time
    peak = peak_flops(mesh.devices.flat)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"devices": mesh.size, "parameters": n_params, "tokens_per_step": int(batch["inputs"].size),
            "step_time": step_time, "tokens_per_second": tokens_per_second, "compile_seconds": compile_seconds,
            "mfu": mfu(tokens_per_second, flops_per_token(cfg.model), peak) if peak else None,
            "loss": float(metrics["loss"]), "ok": bool(jnp.isfinite(metrics["loss"]))}


def attention_agreement(dry: bool) -> dict:
    platform = jax.devices()[0].platform
    fused = "xla" if dry else attention_lib.AUTO.get(platform, "xla")
    b, t, h, k, d = (1, 64, 4, 2, 32) if dry else (2, 1024, 8, 2, 128)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, d), jnp.bfloat16)
    segments = jnp.concatenate([jnp.zeros((b, t // 2), jnp.int32), jnp.ones((b, t - t // 2), jnp.int32)], axis=1)

    def run(name):
        fn = attention_lib.ATTENTION[name]
        with mesh_lib.activation_sharding(mesh_lib.make_mesh(config_lib.MeshConfig(data=1, fsdp=1),
                                                              jax.devices()[:1])):
            loss = lambda q, kk, v: fn(q, kk, v, segments).astype(jnp.float32).sum()  # noqa: E731
            out = jax.jit(lambda q, kk, v: fn(q, kk, v, segments))(q, kk, v)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kk, v)
        return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads]

    out_ref, grads_ref = run("xla")
    out, grads = run(fused)
    grad_diff = max(float(jnp.abs(g - r).max()) for g, r in zip(grads, grads_ref))
    out_diff = float(jnp.abs(out - out_ref).max())
    # bf16 inputs and outputs: one bf16 ulp at |x| ~ 4 is 2**-5; a wrong mask or scale is off by O(1).
    return {"kernel": fused, "reference": "xla", "shape_bthkd": [b, t, h, k, d], "max_abs_diff_out": out_diff,
            "max_abs_diff_grads": grad_diff, "ok": out_diff < 0.05 and grad_diff < 0.5}


def section(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # one section's failure is recorded; the others still run
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: checks that the script itself works")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--adamw-params", type=int, default=200_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per device in the MFU step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)

    jax.config.update("jax_compilation_cache_dir", str(Path("~/.cache/llmx/jax").expanduser()))
    devices = jax.local_devices()
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "dry": args.dry, "platform": devices[0].platform, "device_kind": devices[0].device_kind,
               "local_devices": len(devices), "jax": jax.__version__}
    if not args.skip_tests:
        summary["tests"] = section(run_tests, args.dry)
    summary["adamw"] = section(adamw_bandwidth, 100_000 if args.dry else args.adamw_params, args.steps, args.dry)
    if args.dry:
        model = ["tiny", *TINY, "train.micro_batch_size=2"]
    else:
        model = [f"model.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}"]
    common = [*model, "train.precision=bf16", "mesh.data=1", "mesh.fsdp=-1", "mesh.zero_stage=3"]
    summary["mfu"] = {"one_device": section(train_step_mfu, common, devices[:1], args.steps)}
    if len(devices) > 1:
        summary["mfu"]["all_devices_fsdp"] = section(train_step_mfu, common, devices, args.steps)
    summary["attention"] = section(attention_agreement, args.dry)
    results = [summary.get("tests", {"ok": True}), summary["adamw"], *summary["mfu"].values(), summary["attention"]]
    summary["ok"] = all(r.get("ok") for r in results)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
