import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from llmx import config as config_lib
from llmx import optim
from llmx.models.llama import Llama


def sched(*overrides, total=100):
    cfg = config_lib.load(None, ["optim.lr=1.0", "optim.min_lr_ratio=0.1", *overrides]).optim
    fn = optim.schedule(cfg, total)
    return lambda step: float(fn(step))


def test_constant_with_warmup():
    lr = sched("optim.schedule=constant", "optim.warmup_steps=10")
    assert [lr(s) for s in (0, 5, 10, 50, 99)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])


def test_linear_decays_to_min_ratio():
    lr = sched("optim.schedule=linear", "optim.warmup_steps=10")
    # After warmup: 1.0 -> 0.1 over the remaining 90 steps.
    assert [lr(s) for s in (10, 55, 100, 150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_cosine_by_hand():
    lr = sched("optim.schedule=cosine", "optim.warmup_steps=20")
    for step in (20, 40, 60, 100):
        t = (step - 20) / 80
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        assert lr(step) == pytest.approx(expected, rel=1e-6)
    assert lr(10) == pytest.approx(0.5)


def test_step_decay():
    lr = sched("optim.schedule=step", "optim.step_every=30", "optim.step_gamma=0.5")
    assert [lr(s) for s in (0, 29, 30, 59, 60, 95)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.125])


def test_one_cycle_peaks_at_warmup_end_and_anneals():
    lr = sched("optim.schedule=one_cycle", "optim.warmup_steps=25")
    # optax's 1cycle: starts at peak/25, reaches the peak after pct_start, ends at peak/(25*1e4).
    assert lr(0) == pytest.approx(1 / 25)
    assert lr(25) == pytest.approx(1.0)
    assert lr(100) == pytest.approx(1 / 25 / 1e4, rel=1e-3)
    assert lr(60) < lr(40) < 1.0


def _params():
    cfg = config_lib.load(None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
                                 "model.d_ff=16", "model.vocab_size=32"]).model
    return nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def test_no_weight_decay_on_norm_scales():
    params = _params()
    mask = optim.decay_mask(params)
    assert mask["final_norm"]["scale"].get_value() is False
    assert mask["blocks"]["attn_norm"]["scale"].get_value() is False
    assert mask["blocks"]["attn"]["wq"].get_value() is True
    assert mask["embed"].get_value() is True
    assert all(jax.tree.leaves(optim.decay_mask(params, decay_norms_and_biases=True)))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_chain_matches_optax_by_hand(name):
    """Our chain == clip_by_global_norm + the optax optimizer with the same mask, step by step."""
    cfg = config_lib.load(None, [f"optim.name={name}", "optim.schedule=constant", "optim.lr=0.01",
                                 "optim.weight_decay=0.1", "optim.grad_clip=0.5"]).optim
    params = _params()
    tx, _ = optim.build(cfg, 10)
    mask = optim.decay_mask(params)
    if name == "adamw":
        ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8,
                                                                       weight_decay=0.1, mask=mask))
    else:
        ref = optax.chain(optax.clip_by_global_norm(0.5), optax.masked(optax.add_decayed_weights(0.1), mask),
                          optax.sgd(0.01, momentum=0.9))
    state, ref_state = tx.init(params), ref.init(params)
    p, ref_p = params, params

    # Both sides in one compiled step (op by op, the tree's ~130 distinct eager ops compiled one at a time: 5-7 s).
    @jax.jit
    def steps(i, p, state, ref_p, ref_state):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1 * (i + 1)) * jnp.sign(x + 1e-3), p)
        upd, state = tx.update(grads, state, p)
        ref_upd, ref_state = ref.update(grads, ref_state, ref_p)
        return optax.apply_updates(p, upd), state, optax.apply_updates(ref_p, ref_upd), ref_state

    for i in range(3):
        p, state, ref_p, ref_state = steps(i, p, state, ref_p, ref_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p, ref_p)
    # Norm scales started at 1 and were not decayed toward 0 beyond the plain update.
    assert not np.allclose(jax.tree.leaves(p)[0], jax.tree.leaves(params)[0])


def _zero3_specs(params, axis_size=8):
    """Split each leaf's first dimension the fsdp axis divides (ZeRO-3 style); replicate the others."""

    def spec(x):
        for dim, size in enumerate(x.shape):
            if size % axis_size == 0:
                return P(*([None] * dim), "fsdp")
        return P()

    return jax.tree.map(spec, params)


@pytest.fixture(scope="module")
def fsdp_mesh():
    return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])


def test_pallas_impl_trains_with_the_reference_on_a_cpu_mesh(fsdp_mesh):
    """optim.impl=pallas on a CPU mesh builds the jnp reference (no pallas_call: Pallas only interprets
    on CPU); the kernels are what it builds for TPU and GPU meshes (tests/test_pallas_aot.py)."""
    cfg = config_lib.load(None, ["optim.impl=pallas"]).optim
    params = _params()
    specs = _zero3_specs(params)
    tx, _ = optim.build(cfg, 10, mesh=fsdp_mesh, state_specs=specs)
    assert optim.fused_impl(fsdp_mesh) == "reference"
    assert "pallas_call" not in str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    lr = optim.schedule(cfg, 10)
    kernel = optim.OPTIMIZERS["adamw", "pallas"](cfg, lr, mesh=fsdp_mesh, param_specs=specs, interpret=True)
    assert "pallas_call" in str(jax.make_jaxpr(kernel.update)(params, kernel.init(params), params))
    with pytest.raises(ValueError, match="needs the mesh"):
        optim.build(cfg, 10)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_fused_kernel_equals_its_reference_on_the_model_under_shard_map(name, fsdp_mesh):
    """The interpreted Pallas kernels, built as llmx.optim builds them (weight-decay mask, schedule), on
    the model's parameter tree split ZeRO-3 style over 8 devices, step for step equal the jnp reference
    that trains on CPU."""
    cfg = config_lib.load(None, [f"optim.name={name}", "optim.weight_decay=0.1", "optim.warmup_steps=2"]).optim
    params = _params()
    specs = _zero3_specs(params)
    assert any(spec != P() for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    shardings = jax.tree.map(lambda spec: NamedSharding(fsdp_mesh, spec), specs)
    lr = optim.schedule(cfg, 10)
    results = {}
    for impl, extra in (("pallas", {"interpret": True}), ("reference", {})):
        tx = optim.OPTIMIZERS[name, impl](cfg, lr, mesh=fsdp_mesh, param_specs=specs, **extra)

        @jax.jit
        def step(p, state, i):
            grads = jax.tree.map(lambda x: jnp.cos(x * (i + 1.0)), p)  # (any shape) a gradient that moves
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        p, state = jax.device_put(params, shardings), tx.init(params)
        for i in range(3):
            p, state = step(p, state, i)
        results[impl] = jax.device_get(p)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, results["pallas"], results["reference"])
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), results["reference"], jax.device_get(params))
    assert all(jax.tree.leaves(moved))
