"""`python -m llmx.train --config configs/tiny.yaml [section.key=value ...]`

config -> mesh -> data -> model/optimizer state (sharded at creation) -> jitted step -> the loop
(`llmx.loop`) with its hooks (`llmx.hooks`: stop signal, metrics, checkpoints, eval, profile, sample).
Rerunning the same command on the same `train.run_dir` resumes from the newest checkpoint, data
iterator included.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import jax

from llmx import batch as batch_lib
from llmx import config as config_lib
from llmx import data as data_lib
from llmx import deepspeed, distributed
from llmx import hooks
from llmx import mesh as mesh_lib
from llmx.checkpoint import Checkpointer, initial_state
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.evaluate import build_eval_sets
from llmx.flops import flops_per_token, peak_flops
from llmx.loop import Hook, LoopState, RunSummary
from llmx.loop import run as run_loop
from llmx.metrics import MetricsWriter
from llmx.plan import memory_report
from llmx.step import Steps, build_steps

log = logging.getLogger("llmx")


def enable_compilation_cache(path: str) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))


def build_hooks(cfg: Config, *, steps: Steps, ckpt: Checkpointer, eval_sets, tokenizer, run_dir: Path) -> list[Hook]:
    """The loop's actions in the order it calls them (llmx.hooks says why this order)."""
    t = cfg.train
    metrics = hooks.Metrics(
        every=t.log_every, tokens_per_step=batch_lib.tokens_per_step(cfg, steps.mesh),
        peak_flops=peak_flops(steps.mesh.devices.flat),
        flops_per_token=flops_per_token(cfg.model), on_nan=t.on_nan,
    )
    actions: list[Hook] = [
        hooks.StopOnSignal(),
        metrics,
        hooks.Checkpoint(ckpt, every=cfg.checkpoint.every, metrics=metrics),
        hooks.Evaluate(eval_sets, every=t.eval_every),
    ]
    if t.profile_steps and jax.process_index() == 0:
        actions.append(hooks.Profile(*t.profile_steps, directory=run_dir / "profile"))
    if t.sample_tokens:
        actions.append(hooks.Sample(t.sample_prompt, tokens=t.sample_tokens, tokenizer=tokenizer))
    if t.plot and jax.process_index() == 0:
        actions.append(hooks.Plot(run_dir))
    return actions


def global_batches(train_iter, steps: Steps, *, accum: int) -> Iterator[dict]:
    """This process's rows of each step -> the global (A, B, T) batch, tokens in the step's order."""
    for local in train_iter:
        yield batch_lib.to_global(local, steps.batch_shardings, (accum,), token_order=steps.token_order)


def train(cfg: Config, *, devices=None) -> RunSummary:
    """Trains as configured; returns what the run did (losses, eval losses, the sample, ...)."""
    t_start = time.perf_counter()
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    micro_rows = batch_lib.micro_rows(cfg, mesh)
    data = distributed.first_process_first(
        lambda: data_lib.prepare_data(cfg, run_dir=run_dir if jax.process_index() == 0 else None)
    )
    steps = build_steps(cfg, mesh)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    accum = cfg.train.grad_accum_steps
    rows = data_lib.process_rows(process_index=jax.process_index(), process_count=jax.process_count(),
                                 leading=accum, rows=micro_rows)
    train_iter = iter(
        data_lib.batches(
            data.train, data.tokenizer, seq_len=cfg.model.seq_len, global_rows=accum * micro_rows, rows=rows,
            seed=cfg.train.seed, prefetch=cfg.data.prefetch, text_field=data.text_field,
        )
    )
    writer = None
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        eval_sets = build_eval_sets(cfg, steps, data)
        state, start = initial_state(ckpt, cfg.checkpoint, steps, train_iter)
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log.info(
            "mesh %s on %d %s devices; %.2fM parameters; global batch %d x %d tokens",
            dict(mesh.shape), mesh.size, jax.devices()[0].platform, n_params / 1e6,
            micro_rows * accum, cfg.model.seq_len,
        )
        log.info(memory_report(cfg, steps, state))
        writer = MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start, progress=cfg.train.progress,
                               tensorboard_dir=cfg.train.tensorboard_dir, csv_dir=cfg.train.csv_dir)
        loop = LoopState(cfg=cfg, steps=steps, state=state, train_iter=train_iter, writer=writer,
                         summary=RunSummary(start_step=start), run_dir=run_dir, checkpoint_dir=ckpt.shown)
        actions = build_hooks(cfg, steps=steps, ckpt=ckpt, eval_sets=eval_sets, tokenizer=data.tokenizer,
                              run_dir=run_dir)
        summary = run_loop(loop, actions, global_batches(train_iter, steps, accum=accum),
                           train_step=steps.train)
    finally:
        # Closed on every path (the checkpointer last: a save in flight completes first).
        if writer is not None:
            writer.close()
        train_iter.close()
        ckpt.close()
    summary.wall_seconds = time.perf_counter() - t_start
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG", help="a DeepSpeed ds_config.json, applied on top of --config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    ds = deepspeed.read(args.deepspeed) if args.deepspeed else None
    cfg = config_lib.load(args.config, args.overrides)
    distributed.initialize()
    if ds is not None:  # its batch sizes need the device count of every process
        cfg, _ = deepspeed.load(args.config, ds, args.overrides, n_devices=jax.device_count())
        for warning in ds.warnings if jax.process_index() == 0 else ():
            print(f"warning: {warning}", file=sys.stderr)
    summary = train(cfg)
    if summary.final_eval_loss is not None:
        log.info("final validation loss %.4f after %d steps", summary.final_eval_loss, summary.final_step)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
