"""`python -m llmx.quantize --run-dir R --to int8|int4|fp8 [--group N] [--out DIR]`: post-training weight
quantization of a run into a new run directory that `llmx.evaluate` and `llmx.generate` read like any other.

Every matmul weight (attention and MLP projections, the embedding table, the output projection) is
stored as int8, int4 or fp8 (e4m3) with a scale per output channel, and for `--group N` (int4's
default 32) a scale per N weights along the contracted axis (`llmx.quantization` says which axes).
Norm scales stay as trained. The stacked `layers` axis and each parameter's logical axes are kept, so
the quantized run shards on any mesh the way its source did. The new run gets the source's config
with `model.weight_format` and `model.weight_group` set, its tokenizer, one checkpoint at the source's
step and `quantization.json` (what was done, bytes before and after). The source is only read, the
output directory must not exist, and it appears only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx import models, storage
from llmx.checkpoint import Checkpointer
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.quantization import WEIGHT_TYPES, check_weights, quantize_model, stored_bytes
from llmx.generate import generate as generate_tokens
from llmx.mesh import activation_sharding
from llmx.run import RestoredRun, load_config, restore_run
from llmx.step import build_steps

DEFAULT_GROUPS = {"int4": 32}  # int8 and fp8: a scale per output channel


def default_out(run_dir: str, weight_format: str, group: int) -> Path:
    return Path(f"{str(run_dir).rstrip('/')}-{weight_format}" + (f"g{group}" if group else ""))


def _check_request(cfg: Config, *, run_dir: str, weight_format: str, group: int, out: Path) -> None:
    """Everything that can be refused before a byte is written."""
    if cfg.model.weight_format != "float":
        raise ConfigError(f"{run_dir} already holds {cfg.model.weight_format} weights; quantize the run it was made from")
    source = Path(run_dir).resolve()
    if out.exists():
        raise ConfigError(f"--out {out} exists; llmx.quantize never overwrites, so pick another --out or delete it")
    if out.resolve() == source or source in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the source run {run_dir}; write the quantized run beside it")
    abstract = nnx.eval_shape(lambda: models.get(cfg.model.family).build(cfg.model, rngs=nnx.Rngs(0)))
    check_weights(abstract, group=group)


def quantize_run(*, run_dir: str, weight_format: str, group: int | None = None, out: str | None = None,
                 checkpoint: str | None = None) -> dict:
    """Writes the quantized copy of `run_dir`'s newest (or `checkpoint`'s) parameters; returns the
    report also saved as OUT/quantization.json."""
    if weight_format not in WEIGHT_TYPES:
        raise ConfigError(f"--to {weight_format!r} is not a weight format; choose one of: {', '.join(WEIGHT_TYPES)}")
    group = DEFAULT_GROUPS.get(weight_format, 0) if group is None else group
    if group < 0:
        raise ConfigError(f"--group {group} must be >= 0 (0: a scale per output channel)")
    for flag, value in (("--run-dir", run_dir), ("--out", out or "")):  # a bucket run: quantize a local copy
        storage.check(flag, value, remote_ok=False)
    cfg = load_config(run_dir=run_dir, config=None, overrides=())
    out_dir = Path(out) if out else default_out(run_dir, weight_format, group)
    _check_request(cfg, run_dir=run_dir, weight_format=weight_format, group=group, out=out_dir)

    run = restore_run(run_dir=run_dir, checkpoint=checkpoint)
    qcfg = cfg.replace(model={"weight_format": weight_format, "weight_group": group},
                       train={"run_dir": str(out_dir)}, checkpoint={"restore_from": ""})
    qsteps = build_steps(qcfg, run.steps.mesh)
    graphdef = run.steps.graphdef

    def quantize(params):
        model = quantize_model(nnx.merge(graphdef, params), weight_format=weight_format, group=group)
        return nnx.state(model, nnx.Param)

    qparams = jax.jit(quantize, out_shardings=qsteps.state_shardings.params)(run.params)
    report = {
        "source": str(run.checkpoint),
        "step": run.step,
        "weight_format": weight_format,
        "group": group,
        "parameter_bytes": {"source": stored_bytes(run.params), "quantized": stored_bytes(qparams)},
    }
    report["parameter_bytes"]["ratio"] = report["parameter_bytes"]["quantized"] / report["parameter_bytes"]["source"]

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.yaml").write_text(qcfg.to_yaml())
        tokenizer = Path(run_dir) / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
        ckpt = Checkpointer(tmp / "checkpoints", qcfg.checkpoint)
        try:
            ckpt.save(run.step, {"params": qparams}, data_state={}, config_yaml=qcfg.to_yaml())
        finally:
            ckpt.close()
        (tmp / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["out"] = str(out_dir)
    return report


def agreement(source: RestoredRun, quantized: RestoredRun, prompts: Sequence[Sequence[int]], *,
              new_tokens: int) -> dict:
    """Greedy-token agreement of a quantized run with its source over `new_tokens` per prompt (each
    prompt alone, so no padding): `teacher_forced`, the share of positions of the source's greedy
    continuation where the quantized model's greedy choice (over the same prefix) is the source's own;
    `free_running`, the share of positions where two independent greedy decodes agree."""
    def continuation(run, ids):
        (new,) = generate_tokens(run.params, run.steps.graphdef, [ids], max_new_tokens=new_tokens,
                          max_len=run.cfg.model.seq_len, eos_id=None, mesh=run.steps.mesh)
        return new

    def greedy_choices(run, ids):  # the model's argmax after every prefix of `ids`
        with activation_sharding(run.steps.mesh):
            logits = _forward(run.params, np.asarray([ids], np.int32), graphdef=run.steps.graphdef)
        return np.asarray(logits)

    same_forced = same_free = total = 0
    for ids in prompts:
        ids = list(ids)
        reference = continuation(source, ids)
        full = ids + reference[:-1]  # the prefixes that produced each reference token
        forced_source = greedy_choices(source, full)[len(ids) - 1:]
        forced_quantized = greedy_choices(quantized, full)[len(ids) - 1:]
        free = continuation(quantized, ids)
        n = min(len(reference), len(free))
        same_forced += int((forced_quantized == forced_source).sum())
        same_free += sum(a == b for a, b in zip(reference[:n], free[:n]))
        total += len(reference)
    return {"teacher_forced": same_forced / total, "free_running": same_free / total, "tokens": total}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(params, tokens, *, graphdef):
    """Greedy tokens (T,) after every prefix of one row of tokens (1, T)."""
    return jnp.argmax(nnx.merge(graphdef, params)(tokens)[0], axis=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the trained run to quantize (only read)")
    parser.add_argument("--to", required=True, help="weight format: " + ", ".join(WEIGHT_TYPES))
    parser.add_argument("--group", type=int, help="weights per scale along the contracted axis "
                        "(default: 32 for int4, 0 = per output channel for int8 and fp8)")
    parser.add_argument("--out", help="the new run directory (default: RUN_DIR-FORMAT[gGROUP]); must not exist")
    parser.add_argument("--checkpoint", help="a step directory of the run (default: its newest checkpoint)")
    args = parser.parse_args(argv)
    report = quantize_run(run_dir=args.run_dir, weight_format=args.to, group=args.group, out=args.out,
                          checkpoint=args.checkpoint)
    b = report["parameter_bytes"]
    grouping = f"groups of {report['group']}" if report["group"] else "a scale per output channel"
    print(f"{report['out']}: {report['weight_format']} weights ({grouping}) from {report['source']}; "
          f"parameters {b['source'] / 2**20:.2f} MiB -> {b['quantized'] / 2**20:.2f} MiB ({b['ratio']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
