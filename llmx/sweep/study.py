"""The search: an Optuna study in `SWEEP_DIR/study.db` (SQLite) driven by ask/tell.

Optuna's pruning only fires when the objective reports from the process that holds the trial, and the
trials here are child processes: so the sweep follows each trial's `metrics.jsonl`, calls
`trial.report` with every evaluation itself, and stops the process when `trial.should_prune()` says so.

Resuming: rerunning the sweep opens the same study. Finished trials stay finished; a trial still
RUNNING in the study was interrupted (the sweep stopped or died) and is started again on its own
directory, where the trainer resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from llmx.config import Config
from llmx.errors import ConfigError
from llmx.sweep.spec import SweepSpec, trial_config

log = logging.getLogger("llmx.sweep")
STUDY_FILE = "study.db"
POLL_SECONDS = 0.5


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its `study.stop()` after the last grid point, which raises outside
    `study.optimize` (ask/tell); the sweep counts its trials itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def distributions(spec: SweepSpec) -> dict[str, Any]:
    make = {
        "log_uniform": lambda p: FloatDistribution(*p.values, log=True),
        "uniform": lambda p: FloatDistribution(*p.values),
        "int": lambda p: IntDistribution(*p.values),
        "choice": lambda p: CategoricalDistribution(p.values),
        "grid": lambda p: CategoricalDistribution(p.values),
    }
    return {p.path: make[p.kind](p) for p in spec.space}


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return _GridSampler({p.path: list(p.values) for p in spec.space}, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    # constant_liar: trials running at once are assumed to end badly, so parallel asks spread out.
    return optuna.samplers.TPESampler(n_startup_trials=spec.startup_trials, seed=spec.seed,
                                      constant_liar=spec.parallel > 1)


def make_pruner(spec: SweepSpec, base: Config) -> optuna.pruners.BasePruner:
    min_steps = spec.min_steps or base.train.eval_every or base.train.steps
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=min_steps - 1)
    if spec.pruner == "asha":  # Li et al. 2020, asynchronous successive halving
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, base: Config, sweep_dir: Path, name: str) -> optuna.Study:
    """The study in SWEEP_DIR/study.db, created or continued; a different search space is an error."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{sweep_dir / STUDY_FILE}", sampler=make_sampler(spec),
        pruner=make_pruner(spec, base), direction=spec.direction, load_if_exists=True,
    )
    space = {p.path: [p.kind, list(p.values)] for p in spec.space}
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", spec.metric)
    elif stored != space:
        raise ConfigError(f"{sweep_dir} holds a study of another search space; use another sweep.dir or delete it")
    return study


@dataclasses.dataclass
class _Running:
    trial: optuna.trial.Trial
    handle: Any
    slot: int
    directory: Path
    started: float
    wall_before: float
    values: dict[int, float]
    reported: set[int]
    last_step: int = 0


class _Signals:
    """SIGINT/SIGTERM: stop starting trials, let the running ones checkpoint, leave them RUNNING."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"{number:04d}"


class Driver:
    """Keeps `backend.capacity` trials running until the study has `spec.n_trials` trials."""

    def __init__(self, study: optuna.Study, spec: SweepSpec, base: Config, sweep_dir: Path, backend):
        self.study, self.spec, self.base, self.sweep_dir, self.backend = study, spec, base, sweep_dir, backend
        self.distributions = distributions(spec)
        self.running: dict[int, _Running] = {}
        # Trials prepare the dataset on first use; two preparing the same cache at once would race, so
        # the first trial runs alone until it has written metrics (its data is then in the cache).
        self.data_ready = any((sweep_dir / "trials").glob("*/metrics.jsonl"))

    def run(self) -> str | None:
        """Runs the study to its end; returns the signal's name if it was interrupted."""
        interrupted = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if interrupted:
            log.info("resuming %d interrupted trial(s): %s", len(interrupted), ", ".join(str(t.number) for t in interrupted))
        free = list(range(self.backend.capacity))
        with _Signals() as signals:
            while True:
                while (not signals.received and free and (self.data_ready or not self.running)
                       and (interrupted or self._count() < self.spec.n_trials)):
                    slot = free.pop(0)
                    if interrupted:
                        frozen = interrupted.pop(0)  # a public Trial over a stored one: report/should_prune work
                        started = self._start(optuna.trial.Trial(self.study, frozen._trial_id), frozen, slot)
                    else:
                        started = self._start(self.study.ask(self.distributions), None, slot)
                    if not started:
                        free.insert(0, slot)
                if signals.received or not self.running:
                    break
                time.sleep(POLL_SECONDS)
                for number in list(self.running):
                    if self._poll(self.running[number]):
                        free.append(self.running.pop(number).slot)
            if signals.received:
                log.info("%s: stopping %d running trial(s) at a checkpoint; rerun the same command to continue",
                         signals.received, len(self.running))
                for run in self.running.values():
                    run.handle.stop(graceful=True)
                    run.trial.set_user_attr("wall_seconds", run.wall_before + time.monotonic() - run.started)
        return signals.received

    def _count(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def _start(self, trial: optuna.trial.Trial, frozen, slot: int) -> bool:
        directory = trial_dir(self.sweep_dir, trial.number)
        params = frozen.params if frozen is not None else trial.params
        trial.set_user_attr("dir", str(directory))
        try:
            cfg = trial_config(self.base, params, run_dir=directory)
        except ConfigError as e:  # a combination of values the config refuses
            self._finish(trial, TrialState.FAIL, error=str(e), steps=0, wall=0.0, values={})
            return False
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(cfg.to_yaml())
        previous = frozen.intermediate_values if frozen is not None else {}
        wall_before = float(frozen.user_attrs.get("wall_seconds", 0.0)) if frozen is not None else 0.0
        log.info("trial %d %s: %s", trial.number, "resumed" if frozen is not None else "started",
                 ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        handle = self.backend.launch(directory, slot)
        self.running[trial.number] = _Running(trial, handle, slot, directory, time.monotonic(), wall_before,
                                              dict(previous), set(previous))
        return True

    def _poll(self, run: _Running) -> bool:
        """Follows one trial; True once it is finished (told to the study)."""
        records, status = run.handle.poll()
        self.data_ready = self.data_ready or bool(records) or status is not None
        for record in records:
            verdict = self._record(run, record, finished=status is not None)
            if verdict is not None:
                state, error = verdict
                run.handle.stop(graceful=False)
                self._tell(run, state, error=error)
                return True
        if status is None:
            return False
        final = run.values.get(self.base.train.steps)
        if status == 0 and final is not None:
            self._tell(run, TrialState.COMPLETE, value=final)
        elif status == 0 and run.last_step >= self.base.train.steps:
            self._tell(run, TrialState.FAIL, error=f"metrics.jsonl has no {self.spec.metric} at step {run.last_step}; "
                       "set sweep.metric to a key the trainer writes (eval_loss, loss, ...)")
        elif status == 0:
            self._tell(run, TrialState.FAIL, error=f"the trainer stopped at step {run.last_step} of {self.base.train.steps}")
        else:
            self._tell(run, TrialState.FAIL, error=run.handle.error_line())
        return True

    def _record(self, run: _Running, record: dict, *, finished: bool):
        """One metrics.jsonl line: report evaluations; (state, error) when the trial must stop."""
        step = int(record["step"])
        run.last_step = max(run.last_step, step)
        if "loss" in record and record["loss"] is None:
            return TrialState.FAIL, f"diverged: the loss is not finite at step {step}"
        if self.spec.metric not in record:
            return None
        value = record[self.spec.metric]
        if value is None or not math.isfinite(value):
            return TrialState.FAIL, f"diverged: {self.spec.metric} is not finite at step {step}"
        run.values[step] = value
        if step == 0 or step in run.reported:  # step 0: before any training, the same for every trial
            return None
        run.trial.report(value, step)
        run.reported.add(step)
        if not finished and step < self.base.train.steps and run.trial.should_prune():
            return TrialState.PRUNED, ""
        return None

    def _tell(self, run: _Running, state: TrialState, *, value: float | None = None, error: str = "") -> None:
        wall = run.wall_before + time.monotonic() - run.started
        self._finish(run.trial, state, error=error, steps=run.last_step, wall=wall, values=run.values, value=value)

    def _finish(self, trial, state, *, error: str, steps: int, wall: float, values: dict, value: float | None = None):
        trained = {s: v for s, v in values.items() if s > 0}
        pick = max if self.spec.direction == "maximize" else min
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("wall_seconds", round(wall, 2))
        trial.set_user_attr("error", error)
        trial.set_user_attr("best_value", pick(trained.values()) if trained else None)
        trial.set_user_attr("final_value", trained[max(trained)] if trained else None)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        shown = f"{self.spec.metric} {value:.4f}" if value is not None else error or f"at step {steps}"
        log.info("trial %d %s: %s (%d steps, %.0f s)", trial.number, state.name, shown, steps, wall)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
