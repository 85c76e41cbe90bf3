"""The training loop: one jitted step per batch, and hooks around it.

Everything periodic (metrics, checkpoints, evaluation, profiling, stop requests) is a `Hook`
(`llmx.hooks`), in the spirit of Levanter's `add_hook(every=)` and Flax's periodic actions. A hook sees
the live `LoopState` at four moments: `begin` (before the first step), `before_step`, `after_step`
(with that step's metrics, still on the device: nothing here waits for the step) and `end` (after the
last step or a stop request), and is closed however the run ends.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

from llmx.config import Config
from llmx.metrics import MetricsWriter
from llmx.step import Steps


@dataclasses.dataclass
class RunSummary:
    """What a call of `llmx.train.train` did."""

    start_step: int  # the step the run started from (0, or a resumed checkpoint's)
    final_step: int = 0
    losses: dict[int, float] = dataclasses.field(default_factory=dict)  # per step
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)  # validation loss per eval step
    final_eval_loss: float | None = None  # set when the run reached train.steps
    sample: str | None = None
    plot: Path | None = None
    params: Any = None  # the final parameters (nnx.State, sharded)
    skipped_steps: int = 0  # non-finite steps whose update was dropped
    stopped_by: str | None = None  # the signal that stopped the run early
    compile_seconds: float | None = None  # the first step's wall time
    wall_seconds: float = 0.0  # the whole call, set-up included


@dataclasses.dataclass
class LoopState:
    """The run as hooks see it; `state` is the live train state, replaced by every step."""

    cfg: Config
    steps: Steps
    state: Any  # llmx.step.TrainState
    train_iter: Any  # the data iterator (its state is checkpointed)
    writer: MetricsWriter
    summary: RunSummary
    run_dir: Path
    checkpoint_dir: Path  # as configured, for messages
    stop: str | None = None  # set by a hook to end the run after the current step

    @property
    def start_step(self) -> int:
        return self.summary.start_step

    @property
    def last_step(self) -> int:
        return self.cfg.train.steps

    @property
    def finished(self) -> bool:
        """The run reached train.steps (rather than stopping early)."""
        return self.stop is None and self.summary.final_step == self.last_step


class Hook:
    """One action of the loop; `every` > 0 makes it periodic (see `due`)."""

    every: int = 0

    def due(self, loop: LoopState, step: int) -> bool:
        """A periodic action's turn: a multiple of `every`, not the last step (`end` handles that) and
        not after a stop request."""
        return bool(self.every) and step % self.every == 0 and step != loop.last_step and loop.stop is None

    def begin(self, loop: LoopState) -> None:
        pass

    def before_step(self, loop: LoopState, step: int) -> None:
        pass

    def after_step(self, loop: LoopState, step: int, metrics: dict) -> None:
        pass

    def end(self, loop: LoopState, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def run(loop: LoopState, hooks: list[Hook], batches: Iterator[dict], *, train_step: Callable) -> RunSummary:
    """Steps from `loop.start_step + 1` to `train.steps` (or a stop request), hooks around each step;
    the hooks are closed however this ends."""
    step = loop.start_step
    try:
        for hook in hooks:
            hook.begin(loop)
        for step in range(loop.start_step + 1, loop.last_step + 1):
            batch = next(batches)
            for hook in hooks:
                hook.before_step(loop, step)
            loop.state, metrics = train_step(loop.state, batch)
            for hook in hooks:
                hook.after_step(loop, step, metrics)
            if loop.stop is not None:
                break
        loop.summary.final_step = step
        for hook in hooks:
            hook.end(loop, step)
    finally:
        for hook in hooks:
            hook.close()
    summary = loop.summary
    summary.params = loop.state.params
    summary.skipped_steps = int(loop.state.skipped_steps)
    summary.stopped_by = loop.stop
    return summary
