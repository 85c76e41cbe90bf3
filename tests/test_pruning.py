"""Pruning (`optim.prune_*`): Zhu & Gupta's cubic schedule, exact per-layer sparsity and 2:4 groups in
the saved parameters, masks in the optimizer state that survive kill -9, and llmx.evaluate's report."""

import os
import random
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import CACHE
from helpers import assert_trees_equal, killable, last_step, launch, small_config, wait_for
from llmx import evaluate
from llmx import mesh as mesh_lib
from llmx import pruning
from llmx.checkpoint import Checkpointer
from llmx.cli import run as run_cli
from llmx.step import build_steps
from llmx.train import train


def test_the_schedule_is_zhu_and_gupta_cubic_at_sampled_steps():
    schedule = pruning.Schedule(method="magnitude", sparsity=0.5, begin_step=10, end_step=40, every=10)
    for t in (0, 10, 13, 25, 39, 40, 100):
        progress = min(max((t - 10) / 30, 0.0), 1.0)
        assert float(schedule.target(t)) == pytest.approx(0.5 * (1 - (1 - progress) ** 3), abs=1e-7), t
    assert [t for t in range(60) if schedule.updates_masks(t)] == [10, 20, 30, 40]
    odd = pruning.Schedule(method="magnitude", sparsity=0.5, begin_step=3, end_step=12, every=4)
    assert [t for t in range(20) if odd.updates_masks(t)] == [3, 7, 11, 12]  # and at end_step
    assert pruning.Schedule(method="n_m", sparsity=0.0, begin_step=0, end_step=0, every=1).target(5) == 0.5


def test_masks_keep_the_largest_weights_per_layer_and_per_group_of_m():
    w = jax.random.normal(jax.random.key(0), (3, 16, 8))  # (L, D, F): contracted D
    mask = np.asarray(pruning._magnitude_mask(w, 0.3, 0))
    a = np.abs(np.asarray(w))
    for layer in range(3):
        assert (~mask[layer]).sum() == round(0.3 * 128)
        assert a[layer][~mask[layer]].max() < a[layer][mask[layer]].min()
    two_four = np.asarray(pruning._n_m_mask(w, 2, 4, 1))  # groups of 4 along D
    groups = two_four.reshape(3, 4, 4, 8)
    assert (groups.sum(axis=2) == 2).all()
    kept, dropped = (np.where(g, a.reshape(3, 4, 4, 8), np.inf) for g in (groups, ~groups))
    assert (kept.min(axis=2) >= np.where(~groups, a.reshape(3, 4, 4, 8), -np.inf).max(axis=2)).all()
    assert dropped.shape == kept.shape


def _prunable(run_params, steps):
    """{name: (logical axes, value)} of the pruned projections of a parameter tree."""
    axes = jax.tree_util.tree_flatten_with_path(nnx.get_partition_spec(steps.abstract_state.params),
                                                is_leaf=_is_spec)[0]
    values = jax.tree.leaves(run_params)
    return {jax.tree_util.keystr(path): (tuple(spec), np.asarray(v))
            for (path, spec), v in zip(axes, values, strict=True) if pruning.prunable(tuple(spec))}


def _is_spec(x):
    return isinstance(x, jax.sharding.PartitionSpec)


def _checkpointed(cfg, step):
    """(params, prune masks) saved at `step` of cfg's run."""
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    ckpt = Checkpointer(cfg.train.run_dir + "/checkpoints", cfg.checkpoint, read_only=True)
    try:
        state, _ = ckpt.restore(step, mesh_lib.abstract_with_shardings(steps.abstract_state, steps.state_shardings))
    finally:
        ckpt.close()
    (prune_state,) = [s for s in state.opt_state if isinstance(s, pruning.PruneState)]
    return steps, state.params, prune_state.masks


MAGNITUDE = ["optim.prune_method=magnitude", "optim.prune_sparsity=0.5", "optim.prune_begin_step=2",
             "optim.prune_end_step=11", "optim.prune_every=3", "optim.schedule=constant", "train.steps=16",
             "checkpoint.every=3", "checkpoint.keep=2", "checkpoint.keep_every=6",
             f"train.compilation_cache_dir={CACHE / 'jax'}"]


@pytest.mark.slow
def test_magnitude_pruning_is_exact_follows_its_schedule_and_survives_kill_9(tmp_path, subprocess_env, data_dir):
    kill_at = random.Random().randint(4, 12)
    killed_dir = tmp_path / "killed" / "run"
    proc = launch(tmp_path, subprocess_env, killed_dir, data_dir, *MAGNITUDE)
    try:
        wait_for(proc, lambda: killable(killed_dir, kill_at), f"step {kill_at} and a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last_step(killed_dir) < 16, "the run finished before it was killed"
    rerun = train(small_config(tmp_path / "killed", data_dir, *MAGNITUDE))
    full_cfg = small_config(tmp_path / "full", data_dir, *MAGNITUDE)
    full = train(full_cfg)
    assert rerun.start_step >= 3 and rerun.losses == {s: full.losses[s] for s in rerun.losses}
    assert_trees_equal(rerun.params, full.params)
    _, _, rerun_masks = _checkpointed(small_config(tmp_path / "killed", data_dir, *MAGNITUDE), 16)
    steps, _, full_masks = _checkpointed(full_cfg, 16)
    assert_trees_equal(rerun_masks, full_masks)  # the resumed run kept (and then updated) the same masks

    schedule = pruning.Schedule(method="magnitude", sparsity=0.5, begin_step=2, end_step=11, every=3)
    for step in (6, 12, 16):  # saved after `step` updates: the last mask update was the newest count below it
        steps, params, masks = _checkpointed(full_cfg, step)
        last_update = max(t for t in range(step) if schedule.updates_masks(t))
        for name, (spec, value) in _prunable(params, steps).items():
            layers = np.moveaxis(value, spec.index("layers"), 0).reshape(value.shape[spec.index("layers")], -1)
            zeros = (layers == 0).sum(axis=1)
            want = np.floor(float(schedule.target(last_update)) * layers.shape[1] + 0.5)
            assert (zeros == want).all(), (step, name, zeros, want)
        specs = jax.tree.leaves(nnx.get_partition_spec(steps.abstract_state.params), is_leaf=_is_spec)
        for spec, mask, value in zip(specs, jax.tree.leaves(masks), jax.tree.leaves(params), strict=True):
            mask, value = np.asarray(mask), np.asarray(value)  # pruned: exactly the zeros; the rest: all kept
            assert np.array_equal(mask, value != 0) if pruning.prunable(tuple(spec)) else mask.all()
    # the finished run: exactly half of each layer of each projection is zero; the rest dense
    report = pruning.layer_sparsity(full.params, nnx.get_partition_spec(steps.abstract_state.params))
    assert report and all(f == 0.5 for layers in report.values() for f in layers), report


@pytest.mark.slow
def test_two_four_sparsity_is_exact_and_evaluate_reports_it(tmp_path, data_dir, capsys):
    cfg = small_config(tmp_path, data_dir, "optim.prune_method=n_m", "optim.prune_begin_step=0",
                       "optim.prune_end_step=4", "optim.prune_every=2", "train.steps=6", "checkpoint.every=0")
    summary = train(cfg)
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    pruned = _prunable(summary.params, steps)
    assert len(pruned) == 7  # q, k, v, o, gate, up, down
    for name, (spec, value) in pruned.items():
        axis = pruning.contracted_axes(spec)[-1]
        moved = np.moveaxis(value, axis, -1)
        groups = moved.reshape(*moved.shape[:-1], -1, 4)
        assert ((groups == 0).sum(axis=-1) == 2).all(), name  # exactly 2 of every 4 along the contracted axis
    dense = [v for (path, v) in jax.tree_util.tree_flatten_with_path(summary.params)[0]
             if "embed" in jax.tree_util.keystr(path)]
    assert dense and all((np.asarray(v) != 0).all() for v in dense)  # the embedding stays dense
    assert run_cli(lambda: evaluate.main(["--run-dir", cfg.train.run_dir])) == 0
    out = capsys.readouterr().out
    assert "sparsity (fraction of zero weights) per layer" in out
    assert out.count("0.500 0.500") == 7, out
