"""`python -m llmx.train --config configs/tiny.yaml [section.key=value ...]`

config -> mesh -> data -> model/optimizer state (sharded at creation) -> jitted step -> loop with
periodic hooks (log, eval, checkpoint) -> final eval and a sample. Rerunning the same command on the
same `train.run_dir` resumes from the newest checkpoint, data iterator included.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np

from llmx import config as config_lib
from llmx import data as data_lib
from llmx import distributed
from llmx import mesh as mesh_lib
from llmx import models
from llmx.checkpoint import Checkpointer, initial_state
from llmx.config import Config
from llmx.cli import run as run_cli
from llmx.errors import ConfigError, TrainingError
from llmx.evaluate import build_eval_sets, evaluate_sets
from llmx.flops import mfu, peak_flops
from llmx.generate import sample_text
from llmx.metrics import MetricsWriter
from llmx.plan import memory_report
from llmx.plot import plot_runs
from llmx.step import build_steps

log = logging.getLogger("llmx")


def enable_compilation_cache(path: str) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))


def batch_layout(cfg: Config, mesh) -> int:
    """Global sequences per micro-step, after checking DeepSpeed's arithmetic:
    global batch = micro_batch_size x grad_accum_steps x data-parallel size."""
    t = cfg.train
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp
    if t.global_batch_size and t.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but micro_batch_size {t.micro_batch_size} x "
            f"grad_accum_steps {t.grad_accum_steps} x data-parallel {dp} (mesh.data {mesh.shape['data']} x "
            f"mesh.fsdp {mesh.shape['fsdp']}) = {global_batch}"
        )
    micro_rows = t.micro_batch_size * dp
    if micro_rows % jax.process_count():
        raise ConfigError(
            f"{micro_rows} sequences per micro-step cannot be split over {jax.process_count()} processes; "
            "raise train.micro_batch_size"
        )
    return micro_rows


def to_global(local: dict[str, np.ndarray], shardings: dict, leading: tuple[int, ...]) -> dict:
    """This process's rows -> global arrays laid out by `shardings` (batch over data x fsdp)."""
    out = {}
    for key, value in local.items():
        value = value.reshape(*leading, -1, value.shape[-1])  # (..., B_local, T)
        global_shape = (*leading, value.shape[-2] * jax.process_count(), value.shape[-1])
        out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
    return out


class _StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _close_on_error(*resources):
    """When the loop raises, closes `resources` in order (the checkpointer last: a save in flight
    completes first) and re-raises."""
    try:
        yield
    except BaseException:
        for resource in resources:
            resource.close()
        raise


def train(cfg: Config, *, devices=None) -> dict:
    """Trains as configured; returns a summary (eval losses, per-step losses, the sample)."""
    t_start = time.perf_counter()
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    micro_rows = batch_layout(cfg, mesh)
    data = distributed.first_process_first(
        lambda: data_lib.prepare_data(cfg, run_dir=run_dir if jax.process_index() == 0 else None)
    )
    tokenizer = data.tokenizer
    steps = build_steps(cfg, mesh)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    accum = cfg.train.grad_accum_steps
    rows = data_lib.process_rows(process_index=jax.process_index(), process_count=jax.process_count(),
                                 leading=accum, rows=micro_rows)
    train_iter = iter(
        data_lib.batches(
            data.train, tokenizer, seq_len=cfg.model.seq_len, global_rows=accum * micro_rows, rows=rows,
            seed=cfg.train.seed, prefetch=cfg.data.prefetch, text_field=data.text_field,
        )
    )
    eval_sets = build_eval_sets(cfg, steps, data)

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    state, start = initial_state(ckpt, cfg.checkpoint, steps, train_iter)

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info(
        "mesh %s on %d %s devices; %.2fM parameters; global batch %d x %d tokens",
        dict(mesh.shape), mesh.size, jax.devices()[0].platform, n_params / 1e6,
        micro_rows * cfg.train.grad_accum_steps, cfg.model.seq_len,
    )
    log.info(memory_report(cfg, steps, state))
    writer = MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start, progress=cfg.train.progress)
    summary = {"start_step": start, "losses": {}, "eval_losses": {}}

    def run_eval(step: int) -> float:
        """Every eval set; the first (validation) is `eval_loss`, the others `eval/<name>_loss`."""
        results = evaluate_sets(steps.evaluate, state.params, eval_sets)
        main, others = results[0], results[1:]
        record = {"eval_loss": main.loss, "eval_bits_per_byte": main.bits_per_byte}
        record.update({f"eval/{r.name}_loss": r.loss for r in others})
        summary["eval_losses"][step] = main.loss
        writer.write(step, record)
        writer.message(f"step {step}: " + ", ".join(f"{r.name} loss {r.loss:.4f} ({r.bits_per_byte:.3f} bits/byte)" for r in results))
        return main.loss

    def save(step: int) -> None:
        if pending:
            flush(step)  # under train.on_nan=stop a non-finite step must stop the run before it is saved
        ckpt.save(step, state, data_state=distributed.global_data_state(train_iter.get_state()), config_yaml=cfg.to_yaml())

    def check_finite(step: int, m: dict) -> None:
        if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
            return
        if "loss_scale" in m and np.isfinite(m["loss"]):  # fp16 gradient overflow: loss scaling's business
            writer.message(f"step {step}: fp16 gradient overflow, update skipped; loss scale now {m['loss_scale']:g}")
            return
        if cfg.train.on_nan == "stop":
            raise TrainingError(
                f"step {step}: loss {m['loss']}, grad_norm {m['grad_norm']}; stopped without saving "
                f"(train.on_nan=stop); rerunning resumes from the newest checkpoint in {ckpt.shown}"
            )
        writer.message(f"step {step}: loss {m['loss']}, grad_norm {m['grad_norm']}: update skipped "
                       f"({m['skipped_steps']} so far; train.on_nan=skip)")

    if start == 0 and cfg.train.eval_every:
        run_eval(0)

    peak = peak_flops(mesh.devices.flat)
    flops_per_token = models.get(cfg.model.family).flops_per_token(cfg.model)
    profile = cfg.train.profile_steps if jax.process_index() == 0 else ()
    pending: list[tuple[int, dict]] = []
    tokens_per_step = cfg.model.seq_len * micro_rows * cfg.train.grad_accum_steps
    clock = time.perf_counter()
    timed_from = start + 1  # the first step's time is mostly compilation: not counted in throughput

    def flush(step: int) -> None:
        nonlocal clock, timed_from
        fetched = jax.device_get([m for _, m in pending])  # waits for the steps dispatched so far
        now = time.perf_counter()
        timed = step - timed_from + 1
        step_time = (now - clock) / timed if timed > 0 else float("nan")
        for (s, _), m in zip(pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            m.pop("tokens")
            m["skipped_steps"] = int(m["skipped_steps"])
            summary["losses"][s] = m["loss"]
            tokens_per_second = tokens_per_step / step_time
            writer.write(s, {**m, "step_time": step_time, "tokens_per_second": tokens_per_second,
                             "mfu": mfu(tokens_per_second, flops_per_token, peak)})
            check_finite(s, m)
        last = {k: float(v) for k, v in fetched[-1].items()}
        writer.progress(step, loss=last["loss"], tok_s=tokens_per_step / step_time)
        pending.clear()
        clock, timed_from = now, step + 1

    step = start
    with _StopRequest() as stop, _close_on_error(writer, train_iter, ckpt):
        for step in range(start + 1, cfg.train.steps + 1):
            batch = to_global(next(train_iter), steps.batch_shardings, (cfg.train.grad_accum_steps,))
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(run_dir / "profile"))
            state, metrics = steps.train(state, batch)
            if profile and step == profile[1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                writer.message(f"profile of steps {profile[0]}-{profile[1]} written to {run_dir / 'profile'}")
            pending.append((step, metrics))
            if step == start + 1:
                jax.block_until_ready(metrics)
                summary["compile_seconds"] = time.perf_counter() - clock
                flush(step)
            elif step % cfg.train.log_every == 0 or step == cfg.train.steps or stop.signal:
                flush(step)
            if stop.signal:
                writer.message(f"{stop.signal} received: checkpointing step {step} and exiting")
                break
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                run_eval(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
                save(step)
        if pending:
            flush(step)
        if step > start or ckpt.latest_step() is None:
            save(step)
        ckpt.wait()

    if not stop.signal and step == cfg.train.steps:
        summary["final_eval_loss"] = run_eval(step) if step not in summary["eval_losses"] else summary["eval_losses"][step]
        if cfg.train.sample_tokens:  # every process joins the sharded decode; process 0 prints
            summary["sample"] = sample_text(
                state.params, steps.graphdef, tokenizer, cfg.train.sample_prompt,
                seq_len=cfg.model.seq_len, max_new_tokens=cfg.train.sample_tokens, seed=cfg.train.seed, mesh=mesh,
            )
            writer.message("sample:\n" + cfg.train.sample_prompt + summary["sample"])
    if cfg.train.plot and jax.process_index() == 0:
        plot_runs([run_dir], run_dir / "metrics.png")
        summary["plot"] = run_dir / "metrics.png"
    summary["params"] = state.params
    summary["skipped_steps"] = int(state.skipped_steps)
    summary["stopped_by"] = stop.signal
    summary["final_step"] = step
    summary["wall_seconds"] = time.perf_counter() - t_start
    writer.close()
    ckpt.close()
    train_iter.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    cfg = config_lib.load(args.config, args.overrides)
    distributed.initialize()
    summary = train(cfg)
    if "final_eval_loss" in summary:
        log.info("final validation loss %.4f after %d steps", summary["final_eval_loss"], summary["final_step"])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
