"""`python -m llmx.evaluate --run-dir R` (or `--config X [section.key=value ...]`): loss, perplexity and
bits per byte of a checkpoint on each eval set, as a table or `--json`; with `--tasks NAME[,NAME...]`,
lm-evaluation-harness tasks instead (`llmx.harness`, the `eval` extra; `--include-path DIR` adds task
YAMLs to the project's `configs/tasks/`).

The trainer's periodic eval calls `evaluate` here too, so both report the same number for the same
parameters: per batch, the jitted `eval_step` returns (sum of target nats, target count) and the sums
are added in float64 on the host. Bits per byte (Gao et al. 2020, The Pile §4): total nats /
(ln 2 x UTF-8 bytes of the counted target tokens), the bytes measured by decoding the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llmx import batch as batch_lib
from llmx import data as data_lib
from llmx import pruning, storage
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.run import RestoredRun, restore_run
from llmx.step import Steps

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named, fixed list of device batches (dicts of (B, T) arrays) and their targets' UTF-8 bytes."""

    name: str
    batches: list[dict]
    n_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class EvalResult:
    name: str
    nats: float  # summed target-token cross-entropy
    tokens: float
    n_bytes: int

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1.0)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.n_bytes) if self.n_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": int(self.tokens), "bytes": self.n_bytes}


def evaluate_sets(eval_step: Callable, params, eval_sets: Sequence[EvalSet]) -> list[EvalResult]:
    """Every eval set through `eval_step(params, batch) -> (nats, tokens)`."""
    results = []
    for eval_set in eval_sets:
        nats, tokens = 0.0, 0.0
        for batch in eval_set.batches:
            loss_sum, n_tokens = eval_step(params, batch)
            nats += float(loss_sum)
            tokens += float(n_tokens)
        results.append(EvalResult(eval_set.name, nats, tokens, eval_set.n_bytes))
    return results


def target_bytes(tokenizer, targets: np.ndarray, loss_mask: np.ndarray) -> int:
    """UTF-8 bytes of the counted targets: each maximal run of counted targets in a row is decoded
    whole, so a multi-byte character counts once and special tokens (decoded to '') count zero."""
    total = 0
    targets, loss_mask = targets.reshape(-1, targets.shape[-1]), loss_mask.reshape(-1, loss_mask.shape[-1])
    for row, mask in zip(targets, loss_mask.astype(np.int8)):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # run starts and stops
        for start, stop in edges.reshape(-1, 2):
            total += len(tokenizer.decode(row[start:stop]).encode("utf-8"))
    return total


def build_eval_sets(cfg: Config, steps: Steps, data: data_lib.PreparedData) -> list[EvalSet]:
    """Every named eval set of `data` (`validation` first, then `data.eval_sources`; the training mixture
    when there is none) as the trainer builds its eval batches: the first `train.eval_batches` batches
    in document order."""
    micro_rows = batch_lib.micro_rows(cfg, steps.mesh)
    named = data.eval_sets
    if not named:
        log.warning("the corpus is too small for a validation split (data.validation_percent); evaluating on train")
        named = {"train": data.train}
    eval_sets = []
    for name, source in named.items():
        rows = data_lib.process_rows(process_index=jax.process_index(), process_count=jax.process_count(),
                                     leading=1, rows=micro_rows)
        it = iter(data_lib.batches(source, data.tokenizer, seq_len=cfg.model.seq_len, global_rows=micro_rows,
                                   rows=rows, seed=None, prefetch=0, text_field=data.text_field,
                                   supervised=data.supervised))
        local = [next(it) for _ in range(cfg.train.eval_batches)]
        it.close()
        n_bytes = sum(target_bytes(data.tokenizer, b["targets"], b["loss_mask"]) for b in local)
        if jax.process_count() > 1:
            n_bytes = int(multihost_utils.process_allgather(np.int64(n_bytes)).sum())
        batches = [batch_lib.to_global(b, steps.eval_batch_shardings, (), token_order=steps.token_order) for b in local]
        eval_sets.append(EvalSet(name, batches, n_bytes))
    return eval_sets


def format_table(results: Sequence[EvalResult]) -> str:
    lines = [f"{'eval set':<14}{'tokens':>10}{'bytes':>10}{'loss':>10}{'perplexity':>12}{'bits/byte':>11}"]
    for r in results:
        lines.append(f"{r.name:<14}{int(r.tokens):>10}{r.n_bytes:>10}{r.loss:>10.4f}{r.perplexity:>12.4f}"
                     f"{r.bits_per_byte:>11.4f}")
    return "\n".join(lines)


def run_evaluation(**restore_kwargs) -> tuple[RestoredRun, list[EvalResult]]:
    """Restores a run (see `restore_run`) and evaluates it on every eval set."""
    run = restore_run(**restore_kwargs)
    data = data_lib.prepare_data(run.cfg, run_dir=storage.path(run.cfg.train.run_dir))
    eval_sets = build_eval_sets(run.cfg, run.steps, data)
    return run, evaluate_sets(run.steps.evaluate, run.params, eval_sets)


def load_harness(what: str):
    """`llmx.harness`, or a one-line ConfigError naming `what` needs it when lm_eval is not installed
    (the `eval` extra is optional: nothing imports lm_eval unless tasks are asked for)."""
    try:
        from llmx import harness
    except ModuleNotFoundError as e:
        if not (e.name or "").split(".")[0] in ("lm_eval", "datasets", "evaluate"):
            raise
        raise ConfigError(f"{what} needs lm-evaluation-harness: pip install 'llmx[eval]' ({e.name} is missing)") from None
    return harness


def task_names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def task_runner(cfg: Config, steps: Steps, tokenizer) -> Callable:
    """`train.eval_tasks` as a function of the parameters -> {task: {metric: value}}: the task index is
    built (and every name checked) once, now."""
    harness = load_harness("train.eval_tasks")
    names = task_names(cfg.train.eval_tasks)
    tasks = harness.Tasks([cfg.train.eval_tasks_include] if cfg.train.eval_tasks_include else [])
    tasks.specs(names)

    def run(params) -> dict:
        lm = harness.LlmxLM(params=params, graphdef=steps.graphdef, tokenizer=tokenizer, data_cfg=cfg.data,
                            seq_len=cfg.model.seq_len, mesh=steps.mesh)
        return harness.run_tasks(lm, tasks, names, limit=cfg.train.eval_tasks_limit)

    return run


def run_tasks(args) -> int:
    harness = load_harness("--tasks")
    names = task_names(args.tasks)
    tasks = harness.Tasks(args.include_path or [])
    tasks.specs(names)  # an unknown task stops here, before the checkpoint is read
    run = restore_run(run_dir=args.run_dir, config=args.config, overrides=args.overrides,
                      checkpoint=args.checkpoint, single_device=args.single_device)
    lm = harness.LlmxLM.from_run(run, batch_size=args.batch_size)
    table = harness.run_tasks(lm, tasks, names, limit=args.limit, bootstrap_iters=args.bootstrap_iters)
    if args.json:
        print(json.dumps({"checkpoint": str(run.checkpoint), "step": run.step, "tasks": table}, indent=2))
    else:
        print(f"checkpoint {run.checkpoint} (step {run.step})")
        print(harness.format_table(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.evaluate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a run directory: reads RUN_DIR/config.yaml")
    source.add_argument("--config", help="a YAML config (its train.run_dir holds the checkpoints)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the newest of the run)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--single-device", action="store_true", help="one device instead of the training mesh")
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, NAME[,NAME...] (configs/tasks/ or lm_eval's)")
    parser.add_argument("--include-path", action="append", help="a directory of more task YAMLs (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="--tasks: items per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="--tasks: rows per forward pass")
    parser.add_argument("--bootstrap-iters", type=int, default=0, help="--tasks: bootstrap resamples for stderr (0: none)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    if args.tasks:
        return run_tasks(args)
    run, results = run_evaluation(run_dir=args.run_dir, config=args.config, overrides=args.overrides,
                                  checkpoint=args.checkpoint, single_device=args.single_device)
    sparsity = achieved_sparsity(run)
    if args.json:
        report = {"checkpoint": str(run.checkpoint), "step": run.step, "eval_sets": {r.name: r.to_dict() for r in results}}
        if sparsity:
            report["sparsity"] = sparsity
        print(json.dumps(report, indent=2))
    else:
        print(f"checkpoint {run.checkpoint} (step {run.step})")
        print(format_table(results))
        if sparsity:
            print(format_sparsity(sparsity))
    return 0


def achieved_sparsity(run: RestoredRun) -> dict[str, list[float]]:
    """A pruned run's (optim.prune_method) fraction of zero weights per layer of each projection."""
    if run.cfg.optim.prune_method == "none":
        return {}
    return pruning.layer_sparsity(run.params, nnx.get_partition_spec(run.steps.abstract_state.params))


def format_sparsity(sparsity: dict[str, list[float]]) -> str:
    lines = ["", "sparsity (fraction of zero weights) per layer"]
    width = max(len(name) for name in sparsity)
    for name, layers in sparsity.items():
        lines.append(f"{name:<{width}}  " + " ".join(f"{f:.3f}" for f in layers))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
