"""The training loop's hooks (llmx.loop, llmx.hooks): the order and moments they are called at,
non-finite steps (train.on_nan), and profiling."""

import numpy as np
import pytest

from helpers import assert_trees_equal, checkpoint_steps, read_metrics, small_config
from llmx import batch as batch_lib
from llmx import train as train_lib
from llmx.errors import TrainingError
from llmx.loop import Hook
from llmx.train import train


class Recorder(Hook):
    """Records every call: a new action is one Hook subclass added to the trainer's list."""

    def __init__(self, every: int):
        self.every, self.calls = every, []

    def begin(self, loop):
        self.calls.append(("begin", loop.start_step))

    def after_step(self, loop, step, metrics):
        if self.due(loop, step):
            self.calls.append(("due", step, float(metrics["loss"])))

    def end(self, loop, step):
        self.calls.append(("end", step, loop.finished))

    def close(self):
        self.calls.append(("close",))


def test_a_hook_sees_begin_its_period_end_and_close(tmp_path, data_dir, monkeypatch):
    recorder = Recorder(every=2)
    build_hooks = train_lib.build_hooks
    monkeypatch.setattr(train_lib, "build_hooks", lambda *a, **k: [*build_hooks(*a, **k), recorder])
    summary = train(small_config(tmp_path, data_dir, "train.steps=5", "checkpoint.every=2"))
    # due at 2 and 4 (a multiple of `every`, not the last step); end sees the finished run.
    assert [c[:2] for c in recorder.calls] == [("begin", 0), ("due", 2), ("due", 4), ("end", 5), ("close",)]
    assert recorder.calls[1][2] == summary.losses[2] and recorder.calls[3][2] is True
    assert checkpoint_steps(tmp_path / "run") == [2, 4, 5]


def poison_train_batch(monkeypatch, number: int, vocab_size: int):
    """The `number`-th training batch gets a token id past the vocabulary: its embedding is NaN."""
    to_global, calls = batch_lib.to_global, []

    def poisoned(local, shardings, leading, **kwargs):
        if leading:
            calls.append(1)
            if len(calls) == number:
                local = {**local, "inputs": local["inputs"].copy()}
                local["inputs"][0, 0] = vocab_size
        return to_global(local, shardings, leading, **kwargs)

    monkeypatch.setattr(batch_lib, "to_global", poisoned)


@pytest.mark.slow
def test_on_nan_skip_leaves_the_state_unchanged_and_counts(tmp_path, data_dir, monkeypatch):
    common = ["optim.schedule=constant", "checkpoint.every=0"]
    clean = train(small_config(tmp_path / "clean", data_dir, *common, "train.steps=2"))
    poison_train_batch(monkeypatch, 3, vocab_size=384)
    skipped = train(small_config(tmp_path / "skip", data_dir, *common, "train.steps=3", "train.on_nan=skip"))
    assert np.isnan(skipped.losses[3]) and skipped.skipped_steps == 1
    assert_trees_equal(skipped.params, clean.params)
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "skip" / "run") if "loss" in m] == [0, 0, 1]


def test_on_nan_stop_names_the_step_and_saves_nothing_new(tmp_path, data_dir, monkeypatch):
    poison_train_batch(monkeypatch, 3, vocab_size=384)
    cfg = small_config(tmp_path, data_dir, "train.steps=4", "checkpoint.every=2", "train.on_nan=stop")
    with pytest.raises(TrainingError, match=r"^step 3: loss nan") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert checkpoint_steps(tmp_path / "run") == [2]


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path, data_dir):
    train(small_config(tmp_path, data_dir, "train.steps=4", "train.profile_steps=[2,3]"))
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 1000
