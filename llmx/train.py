"""`python -m llmx.train --config configs/tiny.yaml [section.key=value ...]`

config -> the run directory's lock (`llmx.runlock`) -> mesh -> fit or refuse (`llmx.fit`) -> data ->
model/optimizer state (sharded at creation) -> jitted step -> the loop (`llmx.loop`) with its hooks
(`llmx.hooks`: stop signal, metrics, checkpoints, eval, profile, sample). Rerunning the same command on
the same `train.run_dir` resumes from the newest readable checkpoint, data iterator included.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import jax

from llmx import batch as batch_lib
from llmx import config as config_lib
from llmx import data as data_lib
from llmx import deepspeed, distributed, fit, hooks, runlock, storage
from llmx import mesh as mesh_lib
from llmx import pipeline as pipeline_lib
from llmx.checkpoint import Checkpointer, check_restore_from, initial_state
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.evaluate import build_eval_sets, task_runner
from llmx.flops import flops_per_token, peak_flops, unknown_peak_warning
from llmx.loop import Hook, LoopState, RunSummary
from llmx.loop import run as run_loop
from llmx.metrics import MetricsWriter
from llmx.plan import memory_report
from llmx.step import Steps, build_steps
from llmx.tracking import WandbRun

log = logging.getLogger("llmx")


def enable_compilation_cache(path: str, devices) -> None:
    """JAX's persistent compilation cache at `path` ('' = off) for a run on `devices`. Not for a CPU run
    on several devices: an XLA:CPU executable with collectives loaded from the cache can run them in
    another order on each device and deadlock, the step aborting after 40 s in the rendezvous ("Termination
    timeout for `all gather ...`"; jax 0.10.2: a cold compile of the same step runs, the cached one
    deadlocks every time), and with several processes the gloo collectives of a cached step fail to set up
    ("GetKeyValue() timed out"). Once on, the cache stays on for the process (JAX reads it once)."""
    if not path:
        return
    existing = next(p for p in (Path(path).expanduser().absolute(), *Path(path).expanduser().absolute().parents)
                    if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.compilation_cache_dir={path}: {existing} is a file, not a directory; point it at a "
                          "directory, or '' for no cache")
    devices = list(devices)
    cpu_collectives = devices[0].platform == "cpu" and len(devices) > 1
    cache_on = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
    if cpu_collectives and cache_on:
        log.warning("the persistent compilation cache at %s is on in this process, and a CPU run on %d devices "
                    "may deadlock on an executable loaded from it (jax 0.10.2); set train.compilation_cache_dir='' "
                    "in this process's first run", jax.config.jax_compilation_cache_dir, len(devices))
    elif cpu_collectives:
        # DEBUG: an input error found later must stay the one line a failed run prints (tests/test_faults.py).
        log.debug("compilation cache off: a CPU run on %d devices may deadlock on an executable with collectives "
                  "loaded from it (jax 0.10.2)", len(devices))
    elif not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))


def build_hooks(cfg: Config, *, steps: Steps, ckpt: Checkpointer, eval_sets, tokenizer, run_dir: Path,
                lock: runlock.RunLock | None = None) -> list[Hook]:
    """The loop's actions in the order it calls them (llmx.hooks says why this order)."""
    t = cfg.train
    peak = peak_flops(steps.mesh.devices.flat, per_device=t.peak_flops_per_device)
    if peak is None and jax.process_index() == 0:
        log.warning(unknown_peak_warning(steps.mesh.devices.flat))
    metrics = hooks.Metrics(
        every=t.log_every, tokens_per_step=batch_lib.tokens_per_step(cfg, steps.mesh),
        peak_flops=peak,
        flops_per_token=flops_per_token(cfg.model), on_nan=t.on_nan,
    )
    actions: list[Hook] = [
        hooks.StopOnSignal(every=t.stop_check_every),
        hooks.KeepRunLock(lock),
        metrics,
        hooks.Checkpoint(ckpt, every=cfg.checkpoint.every, metrics=metrics),
        hooks.Evaluate(eval_sets, every=t.eval_every),
    ]
    if t.eval_tasks:  # lm-evaluation-harness, imported only now (the eval extra)
        actions.append(hooks.EvalTasks(task_runner(cfg, steps, tokenizer), every=t.eval_tasks_every or t.eval_every))
    if t.profile_steps and jax.process_index() == 0:
        actions.append(hooks.Profile(*t.profile_steps, directory=run_dir / "profile"))
    if t.sample_tokens:
        actions.append(hooks.Sample(t.sample_prompt, tokens=t.sample_tokens, tokenizer=tokenizer))
    if t.plot and jax.process_index() == 0:
        actions.append(hooks.Plot(run_dir))
    return actions


def data_iterator(cfg: Config, data: data_lib.PreparedData, *, micro_rows: int):
    """This process's rows of every step's batch: a Grain iterator whose state each checkpoint holds."""
    accum = cfg.train.grad_accum_steps
    rows = data_lib.process_rows(process_index=jax.process_index(), process_count=jax.process_count(),
                                 leading=accum, rows=micro_rows)
    return iter(data_lib.batches(
        data.train, data.tokenizer, seq_len=cfg.model.seq_len, global_rows=accum * micro_rows, rows=rows,
        seed=cfg.train.seed, prefetch=cfg.data.prefetch, text_field=data.text_field, supervised=data.supervised,
    ))


def global_batches(train_iter, steps: Steps, *, accum: int) -> Iterator[dict]:
    """This process's rows of each step -> the global (A, B, T) batch, tokens in the step's order."""
    for local in train_iter:
        yield batch_lib.to_global(local, steps.batch_shardings, (accum,), token_order=steps.token_order)


# Paths that may be bucket URIs (llmx.storage), and those that are still local paths only.
URI_KEYS = (("train", "run_dir"), ("checkpoint", "restore_from"), ("train", "tensorboard_dir"))
LOCAL_PATH_KEYS = (("train", "csv_dir"), ("data", "cache_dir"))


def check_paths(cfg: Config) -> None:
    """A bucket URI is checked (its scheme, its filesystem package) where llmx takes one, and refused
    where it still takes a local path: never a local `./gs:/bucket` directory."""
    for keys, remote_ok in ((URI_KEYS, True), (LOCAL_PATH_KEYS, False)):
        for section, key in keys:
            storage.check(f"{section}.{key}", getattr(getattr(cfg, section), key), remote_ok=remote_ok)
    if cfg.train.profile_steps and storage.is_remote(cfg.train.run_dir):
        raise ConfigError(f"train.profile_steps writes a local trace directory, and train.run_dir={cfg.train.run_dir} "
                          "is a bucket; profile in a run with a local train.run_dir")


@contextlib.contextmanager
def run_directory(path: str):
    """The run directory, created. A run that stops with an error before writing anything (a refusal
    while the step is built, a corpus that fails to prepare) removes again the empty directories this
    call created, so a mistyped override leaves nothing behind; a directory that holds anything stays.
    A local `pathlib.Path`, or a bucket's `epath.Path` (llmx.storage: no directories to remove there)."""
    run_dir = storage.path(path)  # reached once already, before check_restore_from looked inside
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={path} is a file, not a directory; point train.run_dir at a directory")
    created = []  # the directories mkdir makes, deepest first
    if not storage.is_remote(path):
        absolute = run_dir.absolute()
        created = [d for d in (absolute, *absolute.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.run_dir={path} cannot be created: {e.strerror or e}") from None
    try:
        yield run_dir
    except BaseException:
        for directory in created:
            try:
                directory.rmdir()  # only an empty directory: what a run wrote is never removed
            except OSError:
                break
        raise


def train(cfg: Config, *, devices=None) -> RunSummary:
    """Trains as configured; returns what the run did (losses, eval losses, the sample, ...)."""
    t_start = time.perf_counter()
    if cfg.model.weight_format != "float":
        raise ConfigError(f"model.weight_format={cfg.model.weight_format}: quantized weights are for llmx.evaluate and "
                          "llmx.generate; train the float run they came from (model.quantization trains quantization-aware)")
    # Inputs that can be checked quickly are, before anything is created or prepared.
    check_paths(cfg)
    data_lib.check_sources(cfg)
    check_restore_from(cfg.checkpoint, storage.reach("train.run_dir", cfg.train.run_dir) / "checkpoints")
    # Whatever is opened is closed in reverse on every path, so an error's one line is the last output.
    with contextlib.ExitStack() as opened:
        run_dir = opened.enter_context(run_directory(cfg.train.run_dir))
        lock = opened.enter_context(runlock.hold(run_dir, wait_seconds=cfg.train.wait_for_lock))
        mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        enable_compilation_cache(cfg.train.compilation_cache_dir, mesh.devices.flat)  # before the first compile
        steps = build_steps(cfg, mesh)
        # Before anything is allocated (or data prepared).
        fits = "fit check skipped (train.skip_fit_check)" if cfg.train.skip_fit_check else fit.check(cfg, steps)
        micro_rows = batch_lib.micro_rows(cfg, mesh)
        data = distributed.first_process_first(
            lambda: data_lib.prepare_data(cfg, run_dir=run_dir if jax.process_index() == 0 else None)
        )

        # The checkpointer is closed last: a save in flight completes after everything else is shut.
        ckpt = opened.enter_context(contextlib.closing(Checkpointer(run_dir / "checkpoints", cfg.checkpoint)))
        train_iter = opened.enter_context(contextlib.closing(data_iterator(cfg, data, micro_rows=micro_rows)))
        eval_sets = build_eval_sets(cfg, steps, data)
        state, start = initial_state(ckpt, cfg.checkpoint, steps, train_iter)
        if jax.process_index() == 0:  # only now: a run that cannot resume leaves the old config as it was
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log.info(
            "mesh %s on %d %s devices; %.2fM parameters; global batch %d x %d tokens",
            dict(mesh.shape), mesh.size, jax.devices()[0].platform, n_params / 1e6,
            micro_rows * cfg.train.grad_accum_steps, cfg.model.seq_len,
        )
        log.info(memory_report(cfg, steps, state))
        log.info(fits)
        if steps.pipeline is not None:
            log.info(pipeline_lib.describe_traffic(
                pipeline_lib.traffic(cfg, mesh, steps.pipeline, steps.abstract_state.params)))
        sinks = (WandbRun(cfg, run_dir),) if cfg.train.wandb_project and jax.process_index() == 0 else ()
        writer = opened.enter_context(contextlib.closing(
            MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start, progress=cfg.train.progress,
                          tensorboard_dir=cfg.train.tensorboard_dir, csv_dir=cfg.train.csv_dir, sinks=sinks)
        ))
        loop = LoopState(cfg=cfg, steps=steps, state=state, train_iter=train_iter, writer=writer,
                         summary=RunSummary(start_step=start), run_dir=run_dir, checkpoint_dir=ckpt.shown)
        actions = build_hooks(cfg, steps=steps, ckpt=ckpt, eval_sets=eval_sets, tokenizer=data.tokenizer,
                              run_dir=run_dir, lock=lock)
        batches = global_batches(train_iter, steps, accum=cfg.train.grad_accum_steps)
        summary = run_loop(loop, actions, batches, train_step=steps.train)
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
