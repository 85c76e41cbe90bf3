"""The trainer end to end on small configs: parallel layouts agree, runs resume where they stopped."""

import logging

import jax
import numpy as np
import pytest

from conftest import REPO
from helpers import SMALL, read_metrics, small_config
from llmx.train import enable_compilation_cache, train


def assert_losses_close(a: dict, b: dict, rtol: float):
    assert a.keys() == b.keys() and a
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=rtol)


@pytest.mark.slow
def test_tiny_config_one_device_equals_data_parallel_8(tmp_path, data_dir, caplog):
    """The same 10 steps of configs/tiny.yaml (fp32) on 1 device and on mesh.data=8; the 8-device run
    leaves the persistent compilation cache off (`enable_compilation_cache`)."""
    common = ["train.steps=10", "train.eval_every=0", "train.sample_tokens=0", "train.progress=false",
              "checkpoint.every=0"]
    one = small_config(tmp_path / "one", data_dir, *common, "train.micro_batch_size=8",
                       config_file=str(REPO / "configs/tiny.yaml"))
    eight = small_config(tmp_path / "eight", data_dir, *common, "mesh.data=8", "train.micro_batch_size=1",
                         config_file=str(REPO / "configs/tiny.yaml"))
    losses_one = train(one, devices=jax.devices()[:1]).losses
    with caplog.at_level(logging.DEBUG, logger="llmx"):
        losses_eight = train(eight).losses
    assert_losses_close(losses_one, losses_eight, rtol=1e-5)
    assert losses_one[10] < losses_one[1]
    assert "compilation cache off: a CPU run on 8 devices may deadlock" in caplog.text


def test_the_persistent_compilation_cache_is_for_one_cpu_device_only(tmp_path, caplog):
    """XLA:CPU steps with collectives loaded from the cache can deadlock: 8 CPU devices leave it off, one
    device turns it on, and a cache already on for a multi-device CPU run is a warning naming the way out."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    path = str(tmp_path / "cache")
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        with caplog.at_level(logging.DEBUG, logger="llmx"):
            enable_compilation_cache(path, jax.devices())
        assert jax.config.jax_compilation_cache_dir is None and "compilation cache off" in caplog.text
        enable_compilation_cache("", jax.devices()[:1])
        assert jax.config.jax_compilation_cache_dir is None
        enable_compilation_cache(path, jax.devices()[:1])
        assert jax.config.jax_compilation_cache_dir == path
        jax.config.update("jax_enable_compilation_cache", True)  # JAX read it at this process's first compile
        caplog.clear()
        enable_compilation_cache(path, jax.devices())
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "train.compilation_cache_dir=''" in caplog.text
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])


@pytest.mark.slow
def test_metrics_jsonl_and_run_directory(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, "train.steps=4", "train.eval_every=2", "train.sample_tokens=8")
    summary = train(cfg)
    run = tmp_path / "run"
    lines = read_metrics(run)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_second", "step_time"} <= m.keys()
        assert np.isfinite(m["loss"]) and m["tokens_per_second"] > 0
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 2, 4]
    assert summary.final_eval_loss == pytest.approx([m for m in lines if "eval_loss" in m][-1]["eval_loss"])
    assert (run / "config.yaml").read_text() == cfg.to_yaml()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "4").is_dir()
    assert isinstance(summary.sample, str)


@pytest.mark.slow
def test_resume_continues_with_the_same_losses(tmp_path, data_dir):
    """Stopping at step 4 and rerunning to 8 gives the losses of an uninterrupted 8-step run:
    the optimizer state and the data iterator both come back from the checkpoint."""
    common = ["optim.schedule=constant", "checkpoint.every=2"]
    full = train(small_config(tmp_path / "full", data_dir, *common, "train.steps=8")).losses
    first = train(small_config(tmp_path / "split", data_dir, *common, "train.steps=4"))
    second = train(small_config(tmp_path / "split", data_dir, *common, "train.steps=8"))
    assert first.start_step == 0 and second.start_step == 4
    assert_losses_close({**first.losses, **second.losses}, full, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
@pytest.mark.slow
def test_pallas_optimizer_trains_like_optax(name, tmp_path, data_dir):
    """20 steps with optim.impl=pallas under ZeRO-3 on 8 devices equal the optax run of the same layout.
    On CPU devices that trains with the fused optimizers' jnp reference, under shard_map like the
    kernels (tests/test_optim.py checks the choice and the interpreted kernels against it)."""
    common = ["train.steps=20", "mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3", "train.micro_batch_size=2",
              f"optim.name={name}", "optim.weight_decay=0.1"]
    optax_run = train(small_config(tmp_path / "optax", data_dir, *common, "optim.impl=optax")).losses
    pallas_run = train(small_config(tmp_path / "pallas", data_dir, *common, "optim.impl=pallas")).losses
    assert_losses_close(pallas_run, optax_run, rtol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch():
    """micro_batch_size=2 x grad_accum_steps=4 is micro_batch_size=8 in one pass (fp32): the loss is
    normalised over the whole step's tokens, not per micro-batch."""
    from llmx import config as config_lib
    from llmx.benchmark import synthetic_batch
    from llmx.mesh import make_mesh
    from llmx.step import build_steps

    model = [s for s in SMALL if s.startswith("model.")]
    results = {}
    for micro, accum in ((8, 1), (2, 4)):
        # SGD: Adam's first step divides by |g| and so magnifies 1-ulp summation-order differences of
        # near-zero gradients past 1e-6; with SGD the update is the gradient itself.
        cfg = config_lib.load(None, [*model, "optim.name=sgd", "optim.lr=0.5", f"train.micro_batch_size={micro}",
                                     f"train.grad_accum_steps={accum}"])
        steps = build_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        big = synthetic_batch(cfg.replace(train={"micro_batch_size": 8, "grad_accum_steps": 1}), steps.mesh, seed=3)
        batch = {k: v.reshape(accum, micro, -1) for k, v in big.items()}
        batch["loss_mask"] = batch["loss_mask"].at[:, :, :5].set(False)  # uneven token counts stay exact
        state, metrics = steps.train(steps.init(), batch)
        results[(micro, accum)] = (float(metrics["loss"]), jax.device_get(state.params))
    (loss_a, params_a), (loss_b, params_b) = results[(8, 1)], results[(2, 4)]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7), params_a, params_b)


def test_a_small_cpu_init_compiles_at_level_0_with_the_same_weights(tmp_path, data_dir, monkeypatch):
    from llmx import mesh as mesh_lib
    from llmx import step as step_lib

    cfg = small_config(tmp_path, data_dir, "mesh.data=8")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    steps = step_lib.build_steps(cfg, mesh)
    small = jax.tree.leaves(steps.abstract_state.params)
    assert step_lib.init_compiler_options(mesh, small) == {"xla_backend_optimization_level": 0}
    large = [jax.ShapeDtypeStruct((step_lib.CPU_QUICK_INIT_MAX_PARAMS + 1,), np.float32)]
    assert step_lib.init_compiler_options(mesh, large) is None  # a large init runs at the default level
    quick = steps.init()
    default = steps.init.lower().compile({"xla_backend_optimization_level": 3})()
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(default)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)
    # The policy's options reach init's compile: an option XLA does not know makes it fail.
    monkeypatch.setattr(step_lib, "init_compiler_options", lambda mesh, params: {"xla_no_such_option": 1})
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
        step_lib.build_steps(cfg, mesh).init()
