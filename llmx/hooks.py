"""The training loop's actions (`llmx.loop.Hook`): the stop signal, the run directory's lock, metrics with the
finite check, checkpoints, evaluation, profiling, and the end-of-run sample and plot.

The trainer (`llmx.train.build_hooks`) lists them in the order the loop calls them: stop, lock,
metrics, checkpoint, eval, ... so a stop request is seen before metrics are flushed, metrics are checked
before a checkpoint is written, and the checkpoint of a step is being written while its evaluation
runs. A new periodic action is one class here and one line in `build_hooks`.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import numpy as np

from llmx import distributed
from llmx.checkpoint import Checkpointer, saved_state
from llmx.errors import ResourceError, TrainingError
from llmx.evaluate import EvalSet, evaluate_sets
from llmx.flops import mfu
from llmx.generate import sample_text
from llmx.loop import Hook, LoopState
from llmx.plot import plot_runs
from llmx.runlock import RunLock

log = logging.getLogger(__name__)


class StopOnSignal(Hook):
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, checkpoint it, exit cleanly.

    With several processes the signal may reach one host only, or hosts at different steps; a process
    that stopped alone would leave the others waiting in the next collective (the checkpoint save
    included). So the processes agree: every `every` steps (`train.stop_check_every`) they all-reduce
    the signal flag (`distributed.max_over_processes`, one tiny all-gather), and a signal on any of them
    stops all of them after the same step. One process decides alone, after the step it is on."""

    def __init__(self, *, every: int = 1):
        self.every = every
        self.signum = 0  # the last signal received here (0: none)
        self._previous = {}

    def begin(self, loop):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def after_step(self, loop, step, metrics):
        if jax.process_count() == 1:
            agreed = self.signum
        elif step % self.every == 0 and step != loop.last_step:
            agreed = distributed.max_over_processes(self.signum)
        else:
            return
        if agreed:
            loop.stop = signal.Signals(agreed).name

    def end(self, loop, step):
        if loop.stop is None:
            return
        text = f"{loop.stop} received: checkpointing step {step} and exiting"
        if jax.process_index() == 0:
            loop.writer.message(text)
        else:  # the other processes log warnings only (llmx.distributed)
            log.warning("process %d: %s", jax.process_index(), text)

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class KeepRunLock(Hook):
    """Stops the run before it writes anything more when another trainer has taken over the run
    directory's lock (it judged this one gone: no heartbeat for `runlock.STALE_SECONDS`)."""

    def __init__(self, lock: RunLock | None):
        self.lock = lock  # None on processes other than 0, which hold no lock

    def after_step(self, loop, step, metrics):
        if self.lock is not None and self.lock.lost_to is not None:
            raise ResourceError(
                f"step {step}: another trainer took over {loop.run_dir} ({self.lock.lost_to.describe()}); "
                "stopped without saving"
            )


class Metrics(Hook):
    """Fetches the metrics of the steps dispatched since the last flush (one host sync every `every`
    steps), writes them with throughput and MFU, and checks them: a non-finite loss stops the run under
    `train.on_nan=stop`. The first step is flushed alone: its time is mostly compilation. MFU is left
    out where `peak_flops` is None (`llmx.flops.peak_flops` knows no figure for the device)."""

    def __init__(self, *, every: int, tokens_per_step: int, peak_flops: float | None, flops_per_token: float,
                 on_nan: str):
        self.every = every
        self.tokens_per_step = tokens_per_step
        self.peak_flops = peak_flops
        self.flops_per_token = flops_per_token
        self.on_nan = on_nan
        self.pending: list[tuple[int, dict]] = []
        self.clock: float | None = None
        self.timed_from = 0

    def before_step(self, loop, step):
        if self.clock is None:
            self.clock, self.timed_from = time.perf_counter(), step

    def after_step(self, loop, step, metrics):
        self.pending.append((step, metrics))
        if step == loop.start_step + 1:
            jax.block_until_ready(metrics)
            loop.summary.compile_seconds = time.perf_counter() - self.clock
            self.flush(loop, step)
        elif step % self.every == 0 or step == loop.last_step or loop.stop is not None:
            self.flush(loop, step)

    def end(self, loop, step):
        self.flush(loop, step)

    def flush(self, loop: LoopState, step: int) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])  # waits for the steps dispatched so far
        now = time.perf_counter()
        timed = step - self.timed_from + 1
        step_time = (now - self.clock) / timed if timed > 0 else float("nan")
        tokens_per_second = self.tokens_per_step / step_time
        for (s, _), m in zip(self.pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            m.pop("tokens")
            m["skipped_steps"] = int(m["skipped_steps"])
            loop.summary.losses[s] = m["loss"]
            m.update(step_time=step_time, tokens_per_second=tokens_per_second)
            if self.peak_flops is not None:  # unknown device, no train.peak_flops_per_device: left out
                m["mfu"] = mfu(tokens_per_second, self.flops_per_token, self.peak_flops)
            loop.writer.write(s, m)
            self._check_finite(loop, s, m)
        last = {k: float(v) for k, v in fetched[-1].items()}
        loop.writer.progress(step, loss=last["loss"], tok_s=tokens_per_second)
        self.pending.clear()
        self.clock, self.timed_from = now, step + 1

    def _check_finite(self, loop: LoopState, step: int, m: dict) -> None:
        if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
            return
        if "loss_scale" in m and np.isfinite(m["loss"]):  # fp16 gradient overflow: loss scaling's business
            loop.writer.message(f"step {step}: fp16 gradient overflow, update skipped; loss scale now {m['loss_scale']:g}")
            return
        if self.on_nan == "stop":
            raise TrainingError(
                f"step {step}: loss {m['loss']}, grad_norm {m['grad_norm']}; stopped without saving "
                f"(train.on_nan=stop); rerunning resumes from the newest checkpoint in {loop.checkpoint_dir}"
            )
        loop.writer.message(f"step {step}: loss {m['loss']}, grad_norm {m['grad_norm']}: update skipped "
                            f"({m['skipped_steps']} so far; train.on_nan=skip)")


class Checkpoint(Hook):
    """Saves the state, the data position and the config every `every` steps and at the end (also
    after a stop request); the metrics are flushed first, so a non-finite step under
    `train.on_nan=stop` stops the run before it is saved."""

    def __init__(self, ckpt: Checkpointer, *, every: int, metrics: Metrics):
        self.ckpt, self.every, self.metrics = ckpt, every, metrics

    def after_step(self, loop, step, metrics):
        if self.due(loop, step):
            self.save(loop, step)

    def end(self, loop, step):
        if step > loop.start_step or self.ckpt.latest_step() is None:
            self.save(loop, step)
        self.ckpt.wait()

    def save(self, loop: LoopState, step: int) -> None:
        self.metrics.flush(loop, step)
        loop.writer.flush()  # a bucket's metrics.jsonl is rewritten, not appended: as far as this checkpoint
        data_state = distributed.global_data_state(loop.train_iter.get_state())
        state = saved_state(loop.state, loop.steps, loop.cfg.checkpoint)  # the adapters alone, when asked
        self.ckpt.save(step, state, data_state=data_state, config_yaml=loop.cfg.to_yaml())

    def close(self):
        self.ckpt.close()  # waits for a save in flight


class Evaluate(Hook):
    """Every eval set every `every` steps, at step 0 of a fresh run and at the end of a finished one:
    the first set (validation) is `eval_loss`, the others `eval/<name>_loss`."""

    def __init__(self, eval_sets: list[EvalSet], *, every: int):
        self.eval_sets, self.every = eval_sets, every

    def begin(self, loop):
        if loop.start_step == 0 and self.every:
            self.run(loop, 0)

    def after_step(self, loop, step, metrics):
        if self.due(loop, step):
            self.run(loop, step)

    def end(self, loop, step):
        if loop.finished:
            summary = loop.summary
            summary.final_eval_loss = summary.eval_losses[step] if step in summary.eval_losses else self.run(loop, step)

    def run(self, loop: LoopState, step: int) -> float:
        results = evaluate_sets(loop.steps.evaluate, loop.state.params, self.eval_sets)
        main, others = results[0], results[1:]
        record = {"eval_loss": main.loss, "eval_bits_per_byte": main.bits_per_byte}
        record.update({f"eval/{r.name}_loss": r.loss for r in others})
        loop.summary.eval_losses[step] = main.loss
        loop.writer.write(step, record)
        loop.writer.message(f"step {step}: " + ", ".join(
            f"{r.name} loss {r.loss:.4f} ({r.bits_per_byte:.3f} bits/byte)" for r in results))
        return main.loss


class EvalTasks(Hook):
    """lm-evaluation-harness tasks (`train.eval_tasks`) every `every` steps, at step 0 of a fresh run and
    at the end of a finished one: `tasks/<task>/<metric>` lines in metrics.jsonl. `runner(params) ->
    {task: {metric: value}}` (`llmx.evaluate.task_runner`) holds the harness, so this module never
    imports it."""

    def __init__(self, runner, *, every: int):
        self.runner, self.every = runner, every
        self.last_step: int | None = None  # the end of a run that just evaluated does not evaluate again

    def begin(self, loop):
        if loop.start_step == 0 and self.every:
            self.run(loop, 0)

    def after_step(self, loop, step, metrics):
        if self.due(loop, step):
            self.run(loop, step)

    def end(self, loop, step):
        if loop.finished and self.last_step != step:
            self.run(loop, step)

    def run(self, loop: LoopState, step: int) -> None:
        self.last_step = step
        table = self.runner(loop.state.params)
        loop.writer.write(step, {f"tasks/{task}/{m}": v for task, metrics in table.items() for m, v in metrics.items()})
        loop.writer.message(f"step {step}: " + "; ".join(
            f"{task} " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()) for task, metrics in table.items()))


class Profile(Hook):
    """A `jax.profiler` trace of steps [first, last] in `directory` (process 0 only)."""

    def __init__(self, first: int, last: int, *, directory):
        self.first, self.last, self.directory = first, last, directory

    def before_step(self, loop, step):
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))

    def after_step(self, loop, step, metrics):
        if step == self.last:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            loop.writer.message(f"profile of steps {self.first}-{self.last} written to {self.directory}")


class Sample(Hook):
    """A sampled continuation of `prompt` at the end of a finished run; every process joins the sharded
    decode, process 0 prints."""

    def __init__(self, prompt: str, *, tokens: int, tokenizer):
        self.prompt, self.tokens, self.tokenizer = prompt, tokens, tokenizer

    def end(self, loop, step):
        if not loop.finished:
            return
        cfg = loop.cfg
        loop.summary.sample = sample_text(
            loop.state.params, loop.steps.graphdef, self.tokenizer, self.prompt, seq_len=cfg.model.seq_len,
            max_new_tokens=self.tokens, seed=cfg.train.seed, mesh=loop.steps.mesh,
        )
        loop.writer.message("sample:\n" + self.prompt + loop.summary.sample)


class Plot(Hook):
    """metrics.png of the run when it ends (process 0)."""

    def __init__(self, run_dir):
        self.path = run_dir / "metrics.png"

    def end(self, loop, step):
        plot_runs([loop.run_dir], self.path)
        loop.summary.plot = self.path
