"""Checkpoints through an Orbax `CheckpointManager`: the train state, the data iterator's state, and
the resolved config, saved asynchronously and atomically.

Atomic in effect: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and renames it to `<step>`
only when every file is written, so a process killed mid-save leaves a temporary directory that
`latest_step` never reports (and that the next run's manager deletes), never a half-written `<step>`.
Restores are checked against the target's shapes on metadata first, so an incompatible checkpoint is
one line naming the array, not a TensorStore traceback; nothing is ever deleted on a failed restore.

A checkpoint that cannot be read back (a truncated or missing file, garbled data-iterator or config
JSON) is corrupt, not incompatible: under `checkpoint.on_corrupt=fallback` a resume moves it aside to
`checkpoints/corrupt/<step>` and continues from the newest checkpoint that reads completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from llmx import distributed, storage
from llmx import mesh as mesh_lib
from llmx.config import CheckpointConfig
from llmx.cli import absl_errors_only
from llmx.data.pipeline import state_from_json, state_to_json
from llmx.errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/<step>: unreadable steps moved aside, never deleted
_DRAIN_SECONDS = 60.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its pending tasks finish before it closes.

    Why: Orbax runs a restore's reads with `asyncio.gather` in a private loop that it closes as soon as
    the gather raises. When one read fails (a truncated file), the other reads are still in flight in
    TensorStore's threads; they complete later by calling `call_soon_threadsafe` on the closed loop
    (a `RuntimeError: Event loop is closed` traceback from TensorStore's thread), and their abandoned
    coroutines print `Exception ignored in: <coroutine ...>` when collected: dozens of tracebacks after
    the one-line error, or in the middle of a run that fell back to an earlier checkpoint."""

    def close(self) -> None:
        pending = [t for t in asyncio.all_tasks(self) if not t.done()]
        if pending and not self.is_running() and not self.is_closed():
            self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
            for task in pending:  # retrieve (or cancel) each outcome: nothing is reported at collection
                if task.done() and not task.cancelled():
                    task.exception()
                else:
                    task.cancel()
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingEventLoop()


@contextlib.contextmanager
def _drained_event_loops():
    """Event loops created meanwhile (Orbax's, for one synchronous restore) drain before closing."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _single_host_array_writes() -> None:
    """Replica-parallel saving splits replicated shards among hosts; with one host it only adds a
    compiled slice per shard (dozens of tiny compilations per save on an 8-device CPU mesh)."""
    if jax.process_count() == 1:
        with absl_errors_only():  # the registry warns about every override
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: TensorStore and Orbax wrap the useful message several times."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'params/blocks/attn/wq': shape, ...}: the same names for a target of ShapeDtypeStructs and for
    Orbax's metadata of the saved tree (nnx.Variable's `value` level dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = tuple(leaf.shape)
    return out


def _describe(name: str) -> str:
    if name.startswith("params/"):
        return "parameter " + name.removeprefix("params/")
    if name.startswith("opt_state/"):
        return "optimizer state " + name.removeprefix("opt_state/")
    return "train state field " + name


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def shape_mismatches(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between the checkpoint's arrays and the model's, parameters first."""
    problems = []
    for name in sorted(wanted, key=lambda n: (not n.startswith("params/"), n)):
        if name not in stored:
            problems.append(f"{_describe(name)} is missing from the checkpoint")
        elif stored[name] != wanted[name]:
            problems.append(
                f"{_describe(name)} has shape {_shape(stored[name])} in the checkpoint but "
                f"{_shape(wanted[name])} in the model"
            )
    extra = sorted(stored.keys() - wanted)
    problems += [f"{_describe(name)} is in the checkpoint but not in the model" for name in extra]
    return problems


class Checkpointer:
    """One run's checkpoint directory. `read_only=True` (another run's checkpoints, for
    `checkpoint.restore_from`) never writes or deletes anything there."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        _single_host_array_writes()
        self.shown = storage.path(directory)  # as configured, for messages
        self.directory = storage.absolute(self.shown)
        policies = [checkpoint_managers.LatestN(n=cfg.keep)]
        if cfg.keep_every:
            policies.append(checkpoint_managers.EveryNSteps(interval_steps=cfg.keep_every))
        # A read-only manager's options warn (in CheckpointManagerOptions itself) that they set
        # save_interval_steps=0, and the manager warns again: both inside.
        with absl_errors_only():
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=cfg.async_save,
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
                create=not read_only,
                read_only=read_only,
                # Temporary directories of saves cut short by a crash: never readable, removed on start.
                cleanup_tmp_directories=not read_only,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # the step of the last save, until it is known to be complete

    def step_dir(self, step: int) -> Path:
        return self.shown / str(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_state: dict, config_yaml: str) -> None:
        """Starts writing `step` (in the background when async); a failure of the previous save
        surfaces here or in `wait` as a CheckpointError."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(state_to_json(data_state)),
            config=ocp.args.JsonSave({"yaml": config_yaml}),
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any write failure (ENOSPC, EACCES, ...) becomes one line
            raise self._save_error(self._in_flight if self._in_flight is not None else step, e) from None
        self._in_flight = step

    def wait(self) -> None:
        """Blocks until the last save is complete on disk."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._in_flight, e) from None
        self._in_flight = None

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
        self._in_flight = None
        # From the disk: after a failed save the manager's own list may already have dropped old steps.
        complete = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != step]
        kept = f"checkpoint {self.step_dir(max(complete))} is intact" if complete else "no earlier checkpoint exists"
        return CheckpointError(f"{self.step_dir(step)}: saving failed ({_reason(error)}); {kept}")

    def _check_shapes(self, step: int, target, *, only_params: bool) -> None:
        """A CheckpointError listing every array whose stored shape differs from `target`'s."""
        path = self.directory / str(step) / "state"
        try:
            with _drained_event_loops():
                metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
        except Exception as e:  # noqa: BLE001 - missing or unreadable _METADATA
            raise CorruptCheckpointError(
                f"{self.step_dir(step)}: cannot read the checkpoint's metadata ({_reason(e)}); "
                "it is incomplete or corrupt"
            ) from None
        stored, wanted = _flat_shapes(metadata), _flat_shapes(target)
        if only_params:
            stored = {k: v for k, v in stored.items() if k.startswith("params/")}
        problems = shape_mismatches(stored, wanted)
        # Parameter mismatches first and alone: the optimizer's moments only repeat them.
        param_problems = [p for p in problems if p.startswith("parameter ")]
        if param_problems:
            hint = "use the model settings it was written with"
        else:
            hint = ("the rest of the train state differs (another optimizer or llmx version?): "
                    "checkpoint.restore_from=<it> with checkpoint.restore_mode=weights in a new run keeps the weights")
        problems = param_problems or problems
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(f"{self.step_dir(step)}: " + "; ".join(problems[:3]) + more + f"; {hint}")

    def _read(self, step: int, args) -> Any:
        try:
            with _drained_event_loops():
                return self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - TensorStore raises plain Exception for truncated files
            raise self._unreadable(step, _reason(e)) from None

    def _unreadable(self, step: int, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.step_dir(step)}: cannot read the checkpoint ({reason}); a file is truncated, corrupt or missing"
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data iterator state) at `step`, placed with the shardings in `abstract_state`
        (ShapeDtypeStructs with `.sharding`), whatever mesh or device count wrote the checkpoint. Every
        part is read (the config too), so a checkpoint that restores is one that reads completely."""
        self._check_shapes(step, abstract_state, only_params=False)
        restored = self._read(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        if not isinstance(restored.data, dict):  # {} (a run imported at step 0) means "from the start"
            raise self._unreadable(step, "its data iterator state is not a data pipeline state")
        if not isinstance(restored.config, dict) or not isinstance(restored.config.get("yaml"), str):
            raise self._unreadable(step, "its config part holds no config")
        return restored.state, state_from_json(restored.data)

    def restore_params(self, step: int, abstract_params) -> Any:
        """Only the parameters at `step` (the optimizer of the checkpoint may differ from ours)."""
        target = {"params": abstract_params}
        self._check_shapes(step, target, only_params=True)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)  # places each array by its sharding
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
        return self._read(step, args).state["params"]

    def move_aside(self, step: int) -> Path:
        """Moves the step directory to `corrupt/<step>` (`<step>.2`, ... if that exists): out of the
        manager's sight, never deleted. Only process 0 moves; every process then re-reads the steps."""
        target = self.shown / CORRUPT_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                n += 1
                target = target.with_name(f"{step}.{n}")
            (self.directory / str(step)).rename(target)
        target = storage.path(distributed.gather_json(str(target))[0])  # process 0's name; a barrier too
        self._manager.reload()
        return target

    def close(self) -> None:
        """Waits for a save in flight, then releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


def resolve(path: str | Path, *, given_as: str) -> tuple[Path, int]:
    """(checkpoint directory, step) of a step directory, a directory of steps (its newest complete
    one) or a run directory (its `checkpoints/`). `given_as` names where the path came from
    ('checkpoint.restore_from', '--checkpoint', '--run-dir') for the messages."""
    path = storage.reach(given_as, path)
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise CheckpointError(f"{given_as} {path}: no such checkpoint, checkpoints directory or run directory")
    with absl_errors_only():
        manager = ocp.CheckpointManager(storage.absolute(path), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"{given_as} {path}: holds no complete checkpoint; train first")
    return path, step


def saved_state(state, steps, cfg: CheckpointConfig):
    """What a checkpoint holds of a train state (or of its abstract target): all of it, or with
    `checkpoint.adapters_only` the LoRA adapters in place of the parameters (the frozen base is
    `checkpoint.restore_from`'s, read again on every restore)."""
    return state.replace(params=steps.partition.split(state.params)[0]) if cfg.adapters_only else state


def _params_target(steps):
    return mesh_lib.abstract_with_shardings(steps.abstract_state.params, steps.state_shardings.params)


def _base_weights(cfg: CheckpointConfig, steps):
    """The frozen base of a LoRA run, from checkpoint.restore_from."""
    directory, step = resolve(cfg.restore_from, given_as="checkpoint.restore_from")
    source = Checkpointer(directory, cfg, read_only=True)
    try:
        return source.restore_params(step, steps.partition.split(_params_target(steps))[1])
    finally:
        source.close()


def load_params(source: Checkpointer, step: int, steps, cfg: CheckpointConfig):
    """The parameters at `step` of a run's own checkpoints: all of them, or (checkpoint.adapters_only)
    its adapters on the base of checkpoint.restore_from."""
    if not cfg.adapters_only:
        return source.restore_params(step, _params_target(steps))
    adapters = source.restore_params(step, steps.partition.split(_params_target(steps))[0])
    return steps.partition.merge(adapters, _base_weights(cfg, steps))


def _weights(source: Checkpointer, step: int, steps):
    """Another run's weights to start from. A LoRA run takes the base from it (a model without
    adapters) and starts fresh adapters, whose B = 0 leaves the base's function unchanged."""
    if not steps.partition.frozen_base:
        return source.restore_params(step, _params_target(steps))
    base = source.restore_params(step, steps.partition.split(_params_target(steps))[1])
    return steps.partition.merge(steps.partition.split(steps.init().params)[0], base)


def check_restore_from(cfg: CheckpointConfig, directory: Path) -> None:
    """`checkpoint.restore_from` resolves, if it will be read: only by a run with no checkpoint of its own."""
    own = directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
    if cfg.restore_from and not own:
        resolve(cfg.restore_from, given_as="checkpoint.restore_from")


def initial_state(ckpt: Checkpointer, cfg: CheckpointConfig, steps, train_iter) -> tuple[Any, int]:
    """(state, step) to train from: the run's own newest readable checkpoint (a resume), else
    `checkpoint.restore_from` (all of it, or only its weights at step 0), else a fresh init.
    A full restore also moves `train_iter` to the saved data position."""
    if ckpt.all_steps():
        return _resume(ckpt, cfg, steps, train_iter)
    if not cfg.restore_from:
        return steps.init(), 0
    directory, step = resolve(cfg.restore_from, given_as="checkpoint.restore_from")
    source = Checkpointer(directory, cfg, read_only=True)
    try:
        if cfg.restore_mode == "full":
            state = _restore_full(source, step, steps, train_iter, dataclasses.replace(cfg, adapters_only=False))
            log.info("resumed from %s at step %d", source.step_dir(step), step)
            return state, step
        params = _weights(source, step, steps)
        log.info("starting at step 0 from the weights of %s", source.step_dir(step))
        return steps.init_from_params(params), 0
    finally:
        source.close()


def _resume(ckpt: Checkpointer, cfg: CheckpointConfig, steps, train_iter) -> tuple[Any, int]:
    """The newest of the run's checkpoints that reads completely. Under `on_corrupt=fallback` the
    unreadable newer ones are moved aside once an older one has restored (so a run whose every
    checkpoint is unreadable stops with nothing moved); under `stop` the first unreadable one stops the run.
    Every process must agree, as each reads different shards: a step counts as read when all did."""
    unreadable: list[tuple[int, str]] = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            state, error = _restore_full(ckpt, step, steps, train_iter, cfg), None
        except CorruptCheckpointError as e:
            state, error = None, str(e)
        errors = [e for e in distributed.gather_json(error) if e is not None]
        if not errors:
            break
        if cfg.on_corrupt == "stop":
            raise CorruptCheckpointError(
                f"{errors[0]} (nothing was moved or deleted); checkpoint.on_corrupt=fallback resumes from the "
                "newest checkpoint that reads completely"
            )
        unreadable.append((step, errors[0]))
    else:
        older = len(unreadable) - 1
        others = f"nor can the {older} older one{'s' * (older > 1)}" if older else "no older checkpoint exists"
        raise CorruptCheckpointError(
            f"{unreadable[0][1]}; {others} (nothing was moved or deleted): repair them, or move {ckpt.shown} away "
            "to start afresh"
        )
    if not unreadable:
        log.info("resumed from %s at step %d", ckpt.step_dir(step), step)
        return state, step
    moved = ", ".join(str(ckpt.move_aside(bad)) for bad, _ in unreadable)
    log.warning("%s; moved to %s; resumed from %s at step %d (checkpoint.on_corrupt=fallback)",
                "; ".join(reason for _, reason in unreadable), moved, ckpt.step_dir(step), step)
    return state, step


def _restore_full(source: Checkpointer, step: int, steps, train_iter, cfg: CheckpointConfig) -> Any:
    abstract = mesh_lib.abstract_with_shardings(steps.abstract_state, steps.state_shardings)
    state, data_state = source.restore(step, saved_state(abstract, steps, cfg))
    if cfg.adapters_only:  # the frozen base, from checkpoint.restore_from
        state = state.replace(params=steps.partition.merge(state.params, _base_weights(cfg, steps)))
    try:
        train_iter.set_state(data_state)
    except Exception as e:  # noqa: BLE001 - Grain rejects a state of a different pipeline
        raise CheckpointError(
            f"{source.step_dir(step)}: its data iterator state does not fit this data pipeline ({_reason(e)}); "
            "use checkpoint.restore_mode=weights to start the data from the beginning"
        ) from None
    return state
