"""`python -m llmx.train --config configs/tiny.yaml [section.key=value ...]`

config -> mesh -> data -> model/optimizer state (sharded at creation) -> jitted step -> loop with
periodic hooks (log, eval, checkpoint) -> final eval and a sample. Rerunning the same command on the
same `train.run_dir` resumes from the newest checkpoint, data iterator included.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np

from llmx import config as config_lib
from llmx import data as data_lib
from llmx import mesh as mesh_lib
from llmx.checkpoint import Checkpointer, abstract_with_shardings
from llmx.config import Config
from llmx.cli import run as run_cli
from llmx.errors import ConfigError
from llmx.generate import sample_text
from llmx.metrics import MetricsWriter
from llmx.step import Steps, build_steps

log = logging.getLogger("llmx")


def enable_compilation_cache(path: str) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))


def batch_layout(cfg: Config, mesh) -> tuple[int, int]:
    """(global sequences per micro-step, this process's rows per optimizer step), after checking
    DeepSpeed's arithmetic: global batch = micro_batch_size x grad_accum_steps x data-parallel size."""
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
    return micro_rows, t.grad_accum_steps * micro_rows // jax.process_count()


def to_global(local: dict[str, np.ndarray], shardings: dict, leading: tuple[int, ...]) -> dict:
    """This process's rows -> global arrays laid out by `shardings` (batch over data x fsdp)."""
    out = {}
    for key, value in local.items():
        value = value.reshape(*leading, -1, value.shape[-1])  # (..., B_local, T)
        global_shape = (*leading, value.shape[-2] * jax.process_count(), value.shape[-1])
        out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
    return out


def _eval_source(sources: dict):
    if "validation" in sources:
        return sources["validation"]
    log.warning("the corpus is too small for a validation split (data.validation_percent); evaluating on train")
    return sources["train"]


def evaluate(steps: Steps, params, eval_batches: list[dict]) -> float:
    """Mean target-token cross-entropy over a fixed list of device batches."""
    total, count = 0.0, 0.0
    for batch in eval_batches:
        loss_sum, n_tokens = steps.evaluate(params, batch)
        total += float(loss_sum)
        count += float(n_tokens)
    return total / max(count, 1.0)


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


def train(cfg: Config, *, devices=None) -> dict:
    """Trains as configured; returns a summary (eval losses, per-step losses, the sample)."""
    t_start = time.perf_counter()
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    micro_rows, local_rows = batch_layout(cfg, mesh)
    tokenizer = data_lib.build_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size)
    sources = data_lib.prepare(
        cfg.data.source,
        cache_dir=cfg.data.cache_dir,
        validation_percent=cfg.data.validation_percent,
        max_documents=cfg.data.max_documents,
    )
    steps = build_steps(cfg, mesh)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    pipeline = dict(
        seq_len=cfg.model.seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = iter(
        data_lib.batches(
            sources["train"], tokenizer, batch_rows=local_rows, seed=cfg.train.seed,
            num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, **pipeline,
        )
    )
    eval_iter = iter(
        data_lib.batches(
            _eval_source(sources), tokenizer,
            batch_rows=micro_rows // jax.process_count(), seed=None, num_threads=0, prefetch=0, **pipeline,
        )
    )
    eval_batches = [to_global(next(eval_iter), steps.eval_batch_shardings, ()) for _ in range(cfg.train.eval_batches)]
    eval_iter.close()

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = ckpt.latest_step()
    if start is not None:
        target = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
        state, data_state = ckpt.restore(start, target)
        train_iter.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
    else:
        start = 0
        state = steps.init()

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info(
        "mesh %s on %d %s devices; %.2fM parameters; global batch %d x %d tokens",
        dict(mesh.shape), mesh.size, jax.devices()[0].platform, n_params / 1e6,
        micro_rows * cfg.train.grad_accum_steps, cfg.model.seq_len,
    )
    writer = MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start, progress=cfg.train.progress)
    summary = {"start_step": start, "losses": {}, "eval_losses": {}}

    def run_eval(step: int) -> float:
        loss = evaluate(steps, state.params, eval_batches)
        summary["eval_losses"][step] = loss
        writer.write(step, {"eval_loss": loss})
        writer.message(f"step {step}: eval_loss {loss:.4f}")
        return loss

    def save(step: int) -> None:
        ckpt.save(step, state, data_state=train_iter.get_state(), config_yaml=cfg.to_yaml())

    if start == 0 and cfg.train.eval_every:
        run_eval(0)

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
            summary["losses"][s] = m["loss"]
            writer.write(s, {**m, "step_time": step_time, "tokens_per_second": tokens_per_step / step_time})
        last = {k: float(v) for k, v in fetched[-1].items()}
        writer.progress(step, loss=last["loss"], tok_s=tokens_per_step / step_time)
        pending.clear()
        clock, timed_from = now, step + 1

    step = start
    with _StopRequest() as stop:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = to_global(next(train_iter), steps.batch_shardings, (cfg.train.grad_accum_steps,))
            state, metrics = steps.train(state, batch)
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
        if cfg.train.sample_tokens and jax.process_index() == 0:
            summary["sample"] = sample_text(
                state.params, steps.graphdef, tokenizer, cfg.train.sample_prompt,
                seq_len=cfg.model.seq_len, max_new_tokens=cfg.train.sample_tokens, seed=cfg.train.seed,
            )
            writer.message("sample:\n" + cfg.train.sample_prompt + summary["sample"])
    summary["params"] = state.params
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
    summary = train(cfg)
    if "final_eval_loss" in summary:
        log.info("final validation loss %.4f after %d steps", summary["final_eval_loss"], summary["final_step"])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
