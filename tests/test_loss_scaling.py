"""fp16 loss scaling with DeepSpeed's semantics: skip, hysteresis, halving, regrowth; in the train step
and in a whole run."""

import jax
import jax.numpy as jnp
import numpy as np

from helpers import read_metrics, small_config
from llmx import config as config_lib
from llmx.benchmark import synthetic_batch
from llmx.loss_scaling import dynamic_scaling, static_scaling
from llmx.mesh import make_mesh
from llmx.step import build_steps
from llmx.train import train

SMALL_MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
               "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=16", "train.micro_batch_size=4",
               "train.steps=100", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2"]


def _run(scaler, overflows):
    state, scales = scaler.init(), []
    for overflow in overflows:
        state = scaler.update(state, jnp.asarray(not overflow))
        scales.append(float(state.scale))
    return scales


def test_dynamic_scaler_follows_deepspeed():
    scaler = dynamic_scaling(initial_scale_power=4, loss_scale_window=3, hysteresis=2, min_loss_scale=2.0)
    # hysteresis 2: the first overflow is tolerated, the second halves, further ones keep halving
    # down to min_loss_scale; 3 clean steps double it and refill the hysteresis.
    steps = [True, True, False, True, True, False, False, False, True, True, False, False, False]
    expected = [16, 8, 8, 4, 2, 2, 2, 4, 4, 2, 2, 2, 4]
    assert _run(scaler, steps) == expected
    assert _run(static_scaling(128.0), [True, False, True]) == [128, 128, 128]


def _fp16_steps(*overrides):
    cfg = config_lib.load(None, [*SMALL_MODEL, "train.precision=fp16", *overrides])
    steps = build_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    return cfg, steps, synthetic_batch(cfg, steps.mesh)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale_then_it_regrows():
    # 2**40 overflows fp16 (max 65504) in the backward pass: the scale must come down first.
    _, steps, batch = _fp16_steps("train.initial_scale_power=40", "train.hysteresis=2", "train.loss_scale_window=4")
    state = steps.init()
    before = jax.device_get((state.params, state.opt_state))
    state, m = steps.train(state, batch)
    assert not np.isfinite(float(m["grad_norm"])) and np.isfinite(float(m["loss"]))
    assert int(m["skipped_steps"]) == 1 and float(m["loss_scale"]) == 2.0**40  # hysteresis: not lowered yet
    after = jax.device_get((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # params and optimizer state unchanged
    state, m = steps.train(state, batch)
    assert int(m["skipped_steps"]) == 2 and float(m["loss_scale"]) == 2.0**39  # halved

    history = []
    for _ in range(60):
        state, m = steps.train(state, batch)
        history.append((float(m["loss_scale"]), int(m["skipped_steps"]), float(m["loss"])))
    scales = [h[0] for h in history]
    first_clean = next(i for i in range(1, len(history)) if history[i][1] == history[i - 1][1])
    low = scales[first_clean]
    assert low < 2.0**39, "the scale never came down to where fp16 gradients fit"
    # 4 clean steps in a row double the scale (it may overflow again later: that is the dance).
    assert max(scales[first_clean:]) >= 2 * low
    assert history[-1][2] < history[first_clean][2], "training did not continue after the overflows"
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_fp16_run_logs_the_scale_and_survives_on_nan_stop(tmp_path, data_dir):
    summary = train(small_config(tmp_path, data_dir, "train.steps=6", "train.precision=fp16",
                                 "train.initial_scale_power=30", "train.hysteresis=1", "train.on_nan=stop"))
    lines = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert all("loss_scale" in m and "skipped_steps" in m for m in lines)
    assert lines[0]["loss_scale"] == 2.0**29  # hysteresis 1: halved at the first overflow
    assert lines[-1]["skipped_steps"] == summary.skipped_steps >= 1
    assert np.isfinite(lines[-1]["loss"])
