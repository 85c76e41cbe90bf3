"""What post-training quantization buys and costs, per weight format.

    python scripts/bench_quant.py [--run-dir runs/tiny] [--json]          # PTQ quality and AOT, below
    python scripts/bench_quant.py quality | aot [--target h100:1x1x8]     # one of the two
    python scripts/bench_quant.py qat [--run-dir runs/tiny]               # QAT runs beside the float one

For the trained tiny run (`--run-dir`; trained with configs/tiny.yaml first if it has no checkpoint),
each format (float, int8, int4, fp8) is written by `llmx.quantize` beside it and measured: parameter
bytes, checkpoint bytes on disk (the float run's parameters are saved alone for a fair comparison),
eval loss and perplexity and their change, and greedy-token agreement with the float model over 200
new tokens per prompt (teacher-forced: the quantized model's greedy choice at every position of the
float model's own continuation; and free-running: position by position of two independent decodes).

Then the decode step (one token for a batch, with a KV cache) of a bf16 model and of its quantized
copies is AOT-compiled for `v5e:2x2` and `h100:1x1x8` (tensor parallel over the slice), in
LLMX_AOT_PYTHON (an environment with the tpu and gpu extras), and XLA's own analyses are reported: the
bytes the step accesses (cost analysis; the CUDA compiler does not give one, so there the bytes of
its arguments, outputs and temporaries from the memory analysis stand in) and its memory. A CPU
cannot show an accelerator's speed-up, so no time is claimed here.

`qat` trains configs/tiny.yaml (300 steps) with `model.quantization=int8` and `=fp8` beside the float
run (RUN_DIR-qat-int8, RUN_DIR-qat-fp8) and compares their validation losses (llmx.evaluate on the
same batches, each model in its own forward: the QAT ones fake-quantised) with the float run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from llmx import config as config_lib  # noqa: E402
from llmx import mesh as mesh_lib  # noqa: E402

PROMPTS = ["def ", "import os\n", "class Parser:\n    def ", "    return self.", "for i in range(", "# Copyright "]
FORMATS = {"int8": 0, "int4": 16, "fp8": 0}  # format -> group (tiny's d_ff=688 has no group of 32)
AOT_MODELS = {  # name -> (config, int4 group): bf16 serving on a tensor-parallel slice
    "tiny": ("configs/tiny.yaml", 16),
    "llama_1b": ("configs/llama_1b_v5e8.yaml", 32),
}
SERVING = ["model.param_dtype=bfloat16", "train.precision=bf16", "model.dtype=auto", "mesh.data=1", "mesh.fsdp=1",
           "mesh.tensor=-1", "mesh.zero_stage=0", "model.remat=none"]


# ---------------------------------------------------------------- AOT decode step (runs in LLMX_AOT_PYTHON)


def aot_decode(config: str, overrides: list[str], *, target: str, weight_format: str, group: int,
               batch: int, max_len: int) -> dict:
    """XLA's analyses of one decode step of `config` for `target`, weights stored as `weight_format`."""
    from llmx import generate, targets
    from llmx.models.layers import KVCache, compute_dtype
    from llmx.quantization import stored_bytes
    from llmx.step import build_steps

    cfg = config_lib.load(REPO / config, [*overrides, *SERVING, f"model.weight_format={weight_format}",
                                          f"model.weight_group={group}"])
    resolved = targets.resolve(target)
    mesh = mesh_lib.make_mesh(cfg.mesh, resolved.devices)
    steps = build_steps(cfg, mesh)
    params = mesh_lib.abstract_with_shardings(steps.abstract_state.params, steps.state_shardings.params)
    m = cfg.model

    def sds(shape, dtype, axes):
        spec = mesh_lib.logical_to_spec(axes, shape, mesh_lib.RULES, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    kv = sds((m.n_layers, batch, max_len, m.n_kv_heads, m.head_dim), compute_dtype(m),
             ("layers", "batch", "seq", "kv_heads", "head_dim"))
    cache = KVCache(k=kv, v=kv, segment_ids=sds((batch, max_len), "int32", ("batch", "seq")))
    tokens = sds((batch,), "int32", ("batch",))
    replicated = mesh_lib.replicated(mesh)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    sampling = {"temperature": scalar("float32"), "top_k": scalar("int32"), "top_p": scalar("float32")}
    with mesh_lib.activation_sharding(mesh):
        compiled = generate._decode_step.lower(params, cache, tokens, tokens, scalar("int32"), key, sampling,
                                               graphdef=steps.graphdef).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    moved = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {
        "target": target, "weight_format": weight_format, "group": group, "devices": mesh.size,
        "mesh": dict(mesh.shape), "weight_bytes_per_device": stored_bytes(params, per_device=True),
        "bytes_accessed": cost.get("bytes accessed"),
        "memory": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                   "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                   "arguments_plus_outputs": moved},
    }


AOT_FORMATS = ("float", "int8", "int4", "fp8")


def aot_all(models: list[str], *, target: str, batch: int, max_len: int, formats=AOT_FORMATS) -> list[dict]:
    rows = []
    for name in models:
        config, int4_group = AOT_MODELS[name]
        for weight_format in formats:
            group = int4_group if weight_format == "int4" else 0
            row = aot_decode(config, [], target=target, weight_format=weight_format, group=group,
                             batch=batch, max_len=max_len)
            rows.append({"model": name, **row})
    return rows


def run_aot_worker(target: str, models: list[str], *, batch: int, max_len: int, formats=AOT_FORMATS) -> list[dict]:
    """`aot` in LLMX_AOT_PYTHON (the tpu/gpu extras live there), as a subprocess."""
    python = os.environ.get("LLMX_AOT_PYTHON", sys.executable)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([python, __file__, "aot", "--target", target, "--models", ",".join(models),
                           "--batch", str(batch), "--max-len", str(max_len), "--formats", ",".join(formats)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode or not lines:
        raise RuntimeError(f"AOT worker for {target} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- quality and bytes of the tiny run


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def params_only_checkpoint_bytes(run_dir: Path, out: Path) -> int:
    """The float run's parameters saved alone, as llmx.quantize saves a quantized run's."""
    from llmx.checkpoint import Checkpointer
    from llmx.run import restore_run

    run = restore_run(run_dir=str(run_dir))
    ckpt = Checkpointer(out, run.cfg.checkpoint)
    try:
        ckpt.save(run.step, {"params": run.params}, data_state={}, config_yaml=run.cfg.to_yaml())
    finally:
        ckpt.close()
    return directory_bytes(out / str(run.step))


def quality(run_dir: Path, *, new_tokens: int) -> dict:
    from llmx.evaluate import run_evaluation
    from llmx.quantize import agreement, default_out, quantize_run
    from llmx.run import restore_run

    source = restore_run(run_dir=str(run_dir))
    _, (base,) = run_evaluation(run_dir=str(run_dir))
    float_ckpt = run_dir.parent / f".{run_dir.name}-params-only"
    rows = [{"format": "float", "group": 0, "parameter_bytes": None, "eval_loss": base.loss,
             "perplexity": base.perplexity,
             "checkpoint_bytes": directory_bytes(source.checkpoint),
             "params_checkpoint_bytes": (directory_bytes(float_ckpt / str(source.step)) if float_ckpt.exists()
                                         else params_only_checkpoint_bytes(run_dir, float_ckpt))}]
    for weight_format, group in FORMATS.items():
        out = default_out(str(run_dir), weight_format, group)
        report = (json.loads((out / "quantization.json").read_text()) if out.exists()
                  else quantize_run(run_dir=str(run_dir), weight_format=weight_format, group=group))
        _, (result,) = run_evaluation(run_dir=str(out))
        quantized = restore_run(run_dir=str(out))
        agree = agreement(source, quantized, [source.tokenizer.encode(p, add_eos=False) for p in PROMPTS],
                          new_tokens=new_tokens)
        rows.append({
            "format": weight_format, "group": group, "parameter_bytes": report["parameter_bytes"],
            "eval_loss": result.loss, "perplexity": result.perplexity,
            "loss_change": result.loss / base.loss - 1, "perplexity_change": result.perplexity / base.perplexity - 1,
            "checkpoint_bytes": directory_bytes(quantized.checkpoint), **agree,
        })
    rows[0]["parameter_bytes"] = {"source": rows[1]["parameter_bytes"]["source"]}
    return {"run_dir": str(run_dir), "step": source.step, "formats": rows}


def ensure_trained(run_dir: Path, *overrides: str) -> None:
    """Trains configs/tiny.yaml into `run_dir` unless it has checkpoints already."""
    if not (run_dir / "checkpoints").is_dir():
        subprocess.run([sys.executable, "-m", "llmx.train", "--config", str(REPO / "configs/tiny.yaml"),
                        f"train.run_dir={run_dir.resolve()}", "train.progress=false", *overrides], check=True,
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def qat(run_dir: Path) -> dict:
    """Validation loss of the QAT runs of configs/tiny.yaml beside the float run's."""
    from llmx.evaluate import run_evaluation

    rows = []
    for mode in ("none", "int8", "fp8"):
        out = run_dir if mode == "none" else run_dir.parent / f"{run_dir.name}-qat-{mode}"
        ensure_trained(out, f"model.quantization={mode}")
        run, (result,) = run_evaluation(run_dir=str(out))
        rows.append({"quantization": mode, "run_dir": str(out), "step": run.step, "eval_loss": result.loss,
                     "perplexity": result.perplexity})
    for row in rows:
        row["loss_change"] = row["eval_loss"] / rows[0]["eval_loss"] - 1
    return {"qat": rows}


def format_report(report: dict) -> str:
    lines = []
    for r in report.get("qat", []):
        lines.append(f"QAT {r['quantization']:<5} {r['run_dir']} (step {r['step']}): eval loss {r['eval_loss']:.4f} "
                     f"({r['loss_change']:+.2%} vs float), perplexity {r['perplexity']:.3f}")
    if "formats" not in report:
        return "\n".join(lines)
    lines += [f"{report['run_dir']} (step {report['step']})",
             f"{'format':<10}{'params MiB':>11}{'ratio':>7}{'ckpt MiB':>10}{'eval loss':>11}{'change':>9}"
             f"{'ppl':>8}{'agree tf':>10}{'agree free':>11}"]
    for r in report["formats"]:
        b = r["parameter_bytes"]
        size = b.get("quantized", b["source"])
        name = r["format"] + (f" g{r['group']}" if r["group"] else "")
        ckpt = r.get("params_checkpoint_bytes", r["checkpoint_bytes"])
        lines.append(f"{name:<10}{size / 2**20:>11.2f}{size / b['source']:>7.3f}{ckpt / 2**20:>10.2f}"
                     f"{r['eval_loss']:>11.4f}{r.get('loss_change', 0.0):>+9.2%}{r['perplexity']:>8.3f}"
                     f"{r.get('teacher_forced', 1.0):>10.1%}{r.get('free_running', 1.0):>11.1%}")
    for row in report.get("aot", []):
        base = next(x for x in report["aot"] if x["model"] == row["model"] and x["target"] == row["target"]
                    and x["weight_format"] == "float")
        accessed = row["bytes_accessed"] or row["memory"]["arguments_plus_outputs"]
        base_accessed = base["bytes_accessed"] or base["memory"]["arguments_plus_outputs"]
        what = "bytes accessed" if row["bytes_accessed"] else "arguments+outputs"
        lines.append(f"AOT decode {row['model']:<9}{row['target']:<12}{row['weight_format']:<6}"
                     f"weights {row['weight_bytes_per_device'] / 2**20:9.2f} MiB/device  {what} "
                     f"{accessed / 2**20:9.2f} MiB ({accessed / base_accessed:.3f}x bf16)  temporaries "
                     f"{row['memory']['temporaries'] / 2**20:8.2f} MiB")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=("all", "quality", "aot", "qat"))
    parser.add_argument("--run-dir", default="runs/tiny", help="the trained float run (trained here if absent)")
    parser.add_argument("--target", action="append", help="AOT targets (default: v5e:2x2 and h100:1x1x8)")
    parser.add_argument("--models", default="tiny,llama_1b", help="AOT models: " + ", ".join(AOT_MODELS))
    parser.add_argument("--formats", default=",".join(AOT_FORMATS), help="AOT weight formats")
    parser.add_argument("--batch", type=int, default=8, help="AOT decode batch")
    parser.add_argument("--max-len", type=int, default=1024, help="AOT decode KV-cache length")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    targets = args.target or ["v5e:2x2", "h100:1x1x8"]
    models = args.models.split(",")
    if args.mode == "aot":
        rows = [r for t in targets for r in aot_all(models, target=t, batch=args.batch, max_len=args.max_len,
                                                     formats=args.formats.split(","))]
        print(json.dumps(rows))
        return 0
    report = {}
    if args.mode == "qat":
        report = qat(Path(args.run_dir))
    if args.mode in ("all", "quality"):
        run_dir = Path(args.run_dir)
        ensure_trained(run_dir)
        report = quality(run_dir, new_tokens=args.new_tokens)
    if args.mode == "all":
        report["aot"] = [r for t in targets for r in run_aot_worker(t, models, batch=args.batch, max_len=args.max_len)]
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
