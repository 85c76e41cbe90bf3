"""Checkpoints you can trust: exact resume after kill -9, preemption, a crash mid-save, a full disk,
restoring onto another mesh, and non-finite losses (bad checkpoints: tests/test_faults.py)."""

import errno
import os
import random
import signal

import jax
import numpy as np
import pytest

from conftest import CACHE
from helpers import SMALL, assert_trees_equal, checkpoint_steps, killable, last_step, launch, small_config, wait_for
from llmx.errors import CheckpointError
from llmx.train import train

EXACT = ["optim.schedule=constant", "train.steps=24", "checkpoint.every=3", "checkpoint.keep=2",
         "checkpoint.keep_every=6", f"train.compilation_cache_dir={CACHE / 'jax'}"]


@pytest.mark.slow  # a trainer subprocess killed or signalled mid-run
def test_kill_9_at_a_random_step_then_rerun_is_bitwise_identical(tmp_path, subprocess_env, data_dir):
    kill_at = random.Random().randint(4, 18)
    killed_dir = tmp_path / "killed" / "run"
    proc = launch(tmp_path, subprocess_env, killed_dir, data_dir, *EXACT)
    try:
        wait_for(proc, lambda: killable(killed_dir, kill_at), f"step {kill_at} and a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = last_step(killed_dir)
    assert killed_after < 24, "the run finished before it was killed"

    rerun = train(small_config(tmp_path / "killed", data_dir, *EXACT))
    full = train(small_config(tmp_path / "full", data_dir, *EXACT))
    start = rerun.start_step
    assert 3 <= start <= killed_after and start % 3 == 0, (kill_at, killed_after, start)
    assert rerun.losses == {s: full.losses[s] for s in range(start + 1, 25)}  # bitwise, not approx
    assert_trees_equal(rerun.params, full.params)
    # keep=2 newest, and every multiple of keep_every=6 forever.
    assert checkpoint_steps(tmp_path / "full" / "run") == [6, 12, 18, 21, 24]


@pytest.mark.slow  # a trainer subprocess killed or signalled mid-run
def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path, subprocess_env, data_dir):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, subprocess_env, run_dir, data_dir, "train.steps=500", "checkpoint.every=0")
    try:
        wait_for(proc, lambda: last_step(run_dir) >= 3, "step 3")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr
    assert checkpoint_steps(run_dir) == [last_step(run_dir)]


@pytest.mark.slow  # a trainer subprocess killed or signalled mid-run
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, subprocess_env, data_dir):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=8", "checkpoint.every=2", "checkpoint.keep=1"]
    proc = launch(tmp_path, subprocess_env, run_dir, data_dir, *overrides, pause=0, block_save_of_step=4)
    try:
        wait_for(proc, (run_dir / "save_blocked").exists, "blocked save of step 4")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert checkpoint_steps(run_dir) == [2]
    assert any(name.startswith("4.orbax-checkpoint-tmp") for name in leftovers), leftovers

    rerun = train(small_config(tmp_path, data_dir, *overrides))
    assert rerun.start_step == 2 and max(rerun.losses) == 8
    names = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert not any("tmp" in name for name in names), names  # the half-written save is cleaned up


@pytest.mark.slow
def test_restore_onto_other_meshes_gives_the_same_next_step_loss(tmp_path, data_dir):
    """A checkpoint of mesh.data=8 continues on fsdp=4 x tensor=2 (ZeRO-3) and on 1 device."""
    common = ["optim.schedule=constant", "checkpoint.every=0"]
    layouts = {
        "data8": ["mesh.data=8", "train.micro_batch_size=1"],
        "fsdp4_tensor2": ["mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=3", "train.micro_batch_size=2"],
        "one_device": ["train.micro_batch_size=8"],
    }
    source = tmp_path / "data8"
    written = train(small_config(source, data_dir, *common, *layouts["data8"], "train.steps=2"))
    step_2 = source / "run" / "checkpoints" / "2"
    next_loss = {"data8": train(small_config(source, data_dir, *common, *layouts["data8"], "train.steps=3")).losses}
    for name in ("fsdp4_tensor2", "one_device"):
        devices = jax.devices()[:1] if name == "one_device" else None
        cfg = small_config(tmp_path / name, data_dir, *common, *layouts[name], "train.steps=3",
                           f"checkpoint.restore_from={step_2}")
        summary = train(cfg, devices=devices)
        assert summary.start_step == 2
        next_loss[name] = summary.losses
    assert next_loss["data8"].keys() == next_loss["one_device"].keys() == next_loss["fsdp4_tensor2"].keys() == {3}
    np.testing.assert_allclose(next_loss["fsdp4_tensor2"][3], next_loss["data8"][3], rtol=1e-5)
    np.testing.assert_allclose(next_loss["one_device"][3], next_loss["data8"][3], rtol=1e-5)

    # restore_mode=weights: step 0, a fresh optimizer and data order; with lr 0 the weights stay as saved.
    source_steps = checkpoint_steps(source / "run")
    weights = train(small_config(tmp_path / "weights", data_dir, *common, "train.steps=1", "optim.lr=0",
                                 f"checkpoint.restore_from={step_2}", "checkpoint.restore_mode=weights"),
                    devices=jax.devices()[:1])
    assert weights.start_step == 0
    assert_trees_equal(weights.params, written.params)
    assert checkpoint_steps(source / "run") == source_steps == [2, 3]  # the source is only read


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_an_error_and_the_previous_checkpoint_survives(tmp_path, data_dir, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, item, directory):
        if directory.parent.name.startswith("4."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await save_fn(self, item, directory)

    overrides = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=1", "optim.schedule=constant"]
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    with pytest.raises(CheckpointError, match=r"checkpoints/4: saving failed \(\[Errno 28\] No space left") as e:
        train(small_config(tmp_path, data_dir, *overrides))
    assert "checkpoints/2 is intact" in str(e.value)
    assert checkpoint_steps(tmp_path / "run") == [2]
    monkeypatch.undo()
    assert train(small_config(tmp_path, data_dir, *overrides)).start_step == 2
