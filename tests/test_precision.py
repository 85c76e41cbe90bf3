"""Mixed precision: how train.precision sets the compute dtype, fp16 dynamic loss scaling with
DeepSpeed's semantics (skip, hysteresis, halving, regrowth), and bf16 tracking fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import read_metrics, small_config
from llmx import config as config_lib
from llmx import flops, precision
from llmx.benchmark import synthetic_batch
from llmx.errors import ConfigError
from llmx.mesh import make_mesh
from llmx.precision import dynamic_scaling, static_scaling
from llmx.step import build_steps
from llmx.train import train

SMALL_MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
               "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=16", "train.micro_batch_size=4",
               "train.steps=100", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2"]


@pytest.mark.parametrize(
    "overrides, dtype",
    [([], "float32"), (["train.precision=bf16"], "bfloat16"), (["train.precision=fp16"], "float16"),
     (["train.precision=bf16", "model.dtype=float32"], "float32"),  # an explicit value wins
     (["model.dtype=bfloat16"], "bfloat16")],
)
def test_precision_sets_the_compute_dtype(overrides, dtype):
    assert config_lib.load(None, overrides).model.dtype == dtype


@pytest.mark.parametrize(
    "overrides, message",
    [(["model.dtype=float16"], "needs|underflow"), (["train.precision=fp16", "model.dtype=bfloat16"], "fp16 computes")],
)
def test_contradicting_precision_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(None, overrides)


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


def test_bf16_training_tracks_fp32(tmp_path, data_dir):
    common = ["train.steps=30", "optim.lr=3e-3"]
    fp32 = train(small_config(tmp_path / "fp32", data_dir, *common))
    bf16 = train(small_config(tmp_path / "bf16", data_dir, *common, "train.precision=bf16"))
    l32, l16 = fp32.losses, bf16.losses
    assert l16[30] < 0.8 * l16[1]
    np.testing.assert_allclose([l16[s] for s in sorted(l16)], [l32[s] for s in sorted(l32)], rtol=0.03)
    assert abs(bf16.final_eval_loss - fp32.final_eval_loss) < 0.02 * fp32.final_eval_loss


def test_offload_optimizer_is_a_no_op_on_cpu():
    cfg = config_lib.load(None, [*SMALL_MODEL, "mesh.offload_optimizer=true"])
    steps = build_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    kinds = {s.memory_kind for s in jax.tree.leaves(steps.state_shardings.opt_state)}
    assert kinds <= {None, "device", "unpinned_host"}
    state, m = steps.train(steps.init(), synthetic_batch(cfg, steps.mesh))
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("spec, a_shape, b_shape", [
    ("btd,df->btf", (2, 8, 16), (16, 24)),  # a projection
    ("btd,dhk->bthk", (2, 8, 16), (16, 2, 4)),  # into heads
    ("bqd,bsd->bqs", (3, 8, 4), (3, 8, 4)),  # attention scores
])
def test_upcast_bf16_dots_equal_native_bf16_dots(monkeypatch, spec, a_shape, b_shape):
    """On CPUs without bf16 matrix hardware bf16 dots run as fp32 dots of the bf16-rounded operands:
    the same products and fp32 sums, so value and gradients equal the native bf16 path's."""
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, a_shape, jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(kb, b_shape, jnp.float32)  # an fp32 master weight, rounded inside
    g = jax.random.normal(kg, jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape, jnp.float32)

    def value_and_grads(upcast: bool):
        monkeypatch.setattr(precision.flops, "cpu_bf16_dots_upcast", lambda: upcast)
        assert precision.upcast_bf16_dots_here() is upcast
        out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b), a, b)
        return out, *vjp(g)

    native, upcast = value_and_grads(False), value_and_grads(True)
    for n, u in zip(native, upcast):
        assert n.dtype == u.dtype
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(n, np.float32), rtol=1e-5, atol=1e-5)
    # Versus plain fp32 maths the rounding to bf16 shows: the upcast path is not secretly fp32.
    exact = jnp.einsum(spec, a.astype(jnp.float32), b)
    assert float(jnp.max(jnp.abs(upcast[0] - exact))) > 1e-4


def test_cpu_matmul_probe_is_cached_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "_PROBES", {})
    calls = []

    def fake_probe():
        calls.append(1)
        return {"native": 1e9, "upcast": 2e9, "flops": 2e9}

    monkeypatch.setattr(flops, "measure_cpu_peak", fake_probe)
    assert flops.cpu_peak_flops() == 2e9 and flops.cpu_bf16_dots_upcast()
    assert flops.cpu_peak_flops() == 2e9 and len(calls) == 1  # cached in this process
    monkeypatch.setattr(flops, "_PROBES", {})
    assert flops.cpu_peak_flops() == 2e9 and len(calls) == 1  # and in the file, for the next one
    monkeypatch.setattr(flops, "_cpu_identity", lambda: "another CPU|avx512f amx_bf16")
    flops.cpu_peak_flops()
    assert len(calls) == 2  # a different CPU probes again


def test_measured_cpu_peak_is_the_faster_of_both_paths():
    probe = flops.measure_cpu_peak(size=256, repeats=2)
    assert probe["native"] > 0 and probe["upcast"] > 0
    assert probe["flops"] == max(probe["native"], probe["upcast"])
