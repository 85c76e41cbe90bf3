"""Fused Pallas optimizers (interpret mode on CPU) against optax, unsharded and ZeRO-sharded."""

import importlib.util
import inspect
import os
from pathlib import Path

# The 8-device CPU mesh must exist before jax initialises (tests/conftest.py may already set it).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import pallas_kernels
from pallas_kernels import blocking, sharded

STEPS = 10
LR = 1e-2
# Odd sizes on purpose: remainders of the 128-lane rows and of the block grid, a scalar,
# a 0-size leaf, and leaves an 8-way fsdp axis splits on dim 0 / dim 1 / not at all.
SHAPES = {
    "cube": (3, 5, 7),
    "vec": (129,),
    "scalar": (),
    "one": (1,),
    "tall": (257, 3),
    "empty": (0, 4),
    "matrix": (40, 64),
    "cols": (5, 16),
}
# 8 rows per block: "matrix" (20 rows) takes a 3-step grid with a padded last block.
SMALL_BLOCKS = pallas_kernels.BlockSizes(block_rows=8)
FP32_TOL = dict(rtol=1e-6, atol=1e-6)

OPTIMIZERS = {
    # name: (pallas factory, reference factory, optax factory), all taking (learning_rate, **kwargs)
    "adamw": (pallas_kernels.adamw, pallas_kernels.adamw_reference, optax.adamw, dict(weight_decay=0.1)),
    "sgd": (pallas_kernels.sgd, pallas_kernels.sgd_reference, optax.sgd, {}),
    "sgd_momentum": (pallas_kernels.sgd, pallas_kernels.sgd_reference, optax.sgd, dict(momentum=0.9)),
    "sgd_nesterov": (pallas_kernels.sgd, pallas_kernels.sgd_reference, optax.sgd, dict(momentum=0.9, nesterov=True)),
    "lamb": (pallas_kernels.lamb, pallas_kernels.lamb_reference, optax.lamb, dict(weight_decay=0.1)),
}


def make_tree(seed: int, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(shape), dtype) for name, shape in SHAPES.items()}


def grad_sequence(dtype=jnp.float32) -> list[dict]:
    return [make_tree(100 + step, dtype) for step in range(STEPS)]


def pallas_tx(name: str, **overrides) -> optax.GradientTransformation:
    factory, _, _, kwargs = OPTIMIZERS[name]
    return factory(LR, **kwargs, block_sizes=SMALL_BLOCKS, interpret=True, **overrides)


def reference_tx(name: str, **overrides) -> optax.GradientTransformation:
    _, reference, _, kwargs = OPTIMIZERS[name]
    return reference(LR, **kwargs, **overrides)


TRANSFORMATIONS = {"pallas": pallas_tx, "reference": reference_tx}


def run(tx, params, grads, *, param_shardings=None, state_shardings=None):
    """STEPS jitted steps of update + apply_updates; returns (params, state)."""

    def step(params, state, grad):
        updates, state = tx.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    if param_shardings is not None:
        params = jax.device_put(params, param_shardings)
        state = jax.device_put(state, state_shardings)
        step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    else:
        step = jax.jit(step)
    for grad in grads:
        params, state = step(params, state, grad)
    return params, state


def assert_trees_close(actual, expected, **tol):
    for key in SHAPES:
        np.testing.assert_allclose(
            np.asarray(actual[key], np.float32), np.asarray(expected[key], np.float32), err_msg=key, **tol
        )


@pytest.fixture(scope="module")
def optax_results():
    """Final params of optax itself, per optimizer, computed once."""
    params, grads = make_tree(0), grad_sequence()
    return {name: run(spec[2](LR, **spec[3]), params, grads)[0] for name, spec in OPTIMIZERS.items()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pallas_matches_optax(name, optax_results):
    params, _ = run(pallas_tx(name), make_tree(0), grad_sequence())
    assert_trees_close(params, optax_results[name], **FP32_TOL)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_reference_matches_optax(name, optax_results):
    params, _ = run(reference_tx(name), make_tree(0), grad_sequence())
    assert_trees_close(params, optax_results[name], **FP32_TOL)


# ---------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    assert len(devices) >= 8, (
        f"needs 8 CPU devices, found {len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "before jax is imported (tests/conftest.py)"
    )
    return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,), devices=devices[:8])


def zero_spec(shape, axis_size=8) -> PartitionSpec:
    """Split the first dim the fsdp axis divides; replicate leaves it divides nowhere."""
    for dim, size in enumerate(shape):
        if size > 0 and size % axis_size == 0:
            return PartitionSpec(*([None] * dim), "fsdp")
    return PartitionSpec()


def state_specs(state, param_specs):
    """PartitionSpecs of an optimizer state: count replicated, per-parameter trees like their parameter."""
    return type(state)(
        *(
            PartitionSpec() if isinstance(field, jax.Array) else sharded.per_leaf_specs(field, param_specs)
            for field in state
        )
    )


@pytest.mark.parametrize("impl", TRANSFORMATIONS)
@pytest.mark.parametrize("zero_stage", [1, 3])
@pytest.mark.parametrize("name", ["adamw", "sgd_nesterov", "lamb"])
def test_sharded_matches_optax(name, zero_stage, impl, mesh, optax_results):
    """The kernels (interpreted) and their jnp reference, each device updating its shard under shard_map."""
    params = make_tree(0)
    param_specs = {key: zero_spec(x.shape) for key, x in params.items()}
    assert param_specs["matrix"] == PartitionSpec("fsdp") and param_specs["cols"] == PartitionSpec(None, "fsdp")
    tx = TRANSFORMATIONS[impl](name, mesh=mesh, param_specs=param_specs)
    # ZeRO-1: params (and grads) replicated, state split. ZeRO-3: everything split.
    param_shardings = {
        key: NamedSharding(mesh, spec if zero_stage == 3 else PartitionSpec()) for key, spec in param_specs.items()
    }
    shardings_of_state = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(tx.init(params), param_specs))
    grads = [jax.device_put(g, param_shardings) for g in grad_sequence()]
    final, state = run(tx, params, grads, param_shardings=param_shardings, state_shardings=shardings_of_state)
    assert_trees_close(final, optax_results[name], **FP32_TOL)
    # Each device holds only its shard of the state.
    moment = state.trace["matrix"] if name == "sgd_nesterov" else state.mu["matrix"]
    assert moment.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("fsdp")), 2)
    assert {shard.data.shape for shard in moment.addressable_shards} == {(5, 64)}


def test_lamb_sharded_norms_need_the_psum(mesh):
    """Guard on the test above: the same kernels under shard_map without the psum give a different step."""
    params, grad = make_tree(0), grad_sequence()[0]
    param_specs = {key: zero_spec(x.shape) for key, x in params.items()}
    tx = pallas_tx("lamb", mesh=mesh, param_specs=param_specs)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grad, state, params)
    specs_of_state = state_specs(state, param_specs)
    per_shard_norms = jax.shard_map(
        pallas_tx("lamb").update,  # unsharded transformation: norms of the local shard only
        mesh=mesh,
        in_specs=(param_specs, specs_of_state, param_specs),
        out_specs=(param_specs, specs_of_state),
        check_vma=False,
    )
    wrong, _ = jax.jit(per_shard_norms)(grad, state, params)
    assert not np.allclose(np.asarray(updates["matrix"]), np.asarray(wrong["matrix"]), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(updates["vec"]), np.asarray(wrong["vec"]), **FP32_TOL)  # replicated leaf


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "lamb"])
def test_bf16_params_follow_fp32_master(name):
    """bf16 params + fp32 master: the master equals optax on fp32 params; the params are its bf16 rounding."""
    _, _, optax_factory, kwargs = OPTIMIZERS[name]
    params16 = make_tree(0, jnp.bfloat16)
    grads16 = grad_sequence(jnp.bfloat16)
    params, state = run(pallas_tx(name), params16, grads16)
    expected, _ = run(
        optax_factory(LR, **kwargs),
        jax.tree.map(lambda x: x.astype(jnp.float32), params16),
        [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in grads16],
    )
    assert all(params[key].dtype == jnp.bfloat16 for key in SHAPES)
    assert_trees_close(state.master, expected, **FP32_TOL)
    for key in SHAPES:  # within one bf16 rounding of the reference (ulp 2^-7 relative; a step's size near 0)
        want = np.asarray(expected[key].astype(jnp.bfloat16), np.float32)
        scale = float(np.max(np.abs(want), initial=0.0))
        np.testing.assert_allclose(
            np.asarray(params[key], np.float32), want, rtol=2**-7, atol=2**-8 * scale, err_msg=key
        )


def test_master_weights_off_keeps_no_copy():
    tx = pallas_tx("adamw", master_weights=False)
    assert jax.tree.leaves(tx.init(make_tree(0, jnp.bfloat16)).master) == []
    params, state = run(tx, make_tree(0, jnp.bfloat16), grad_sequence(jnp.bfloat16))
    assert params["matrix"].dtype == jnp.bfloat16 and state.mu["matrix"].dtype == jnp.float32


def test_sgd_without_params_like_optax():
    """optax.sgd needs no params; neither does the fused one while no leaf has a master copy."""
    params, grad = make_tree(0), grad_sequence()[0]
    tx = pallas_tx("sgd_momentum")
    ours, _ = jax.jit(tx.update)(grad, tx.init(params))
    expected, _ = optax.sgd(LR, momentum=0.9).update(grad, optax.sgd(LR, momentum=0.9).init(params))
    assert_trees_close(ours, expected, **FP32_TOL)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(grad, tx.init(make_tree(0, jnp.bfloat16)))


def test_fp32_params_have_no_master_copy():
    state = pallas_tx("lamb").init(make_tree(0))
    assert jax.tree.leaves(state.master) == []


# ---------------------------------------------------------------- hyperparameters


def test_schedules_as_learning_rate_and_weight_decay():
    learning_rate = optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=3, decay_steps=10)
    weight_decay = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    params, grads = make_tree(0), grad_sequence()
    ours, _ = run(
        pallas_kernels.adamw(learning_rate, weight_decay=weight_decay, block_sizes=SMALL_BLOCKS, interpret=True),
        params,
        grads,
    )
    expected, _ = run(optax.adamw(learning_rate, weight_decay=weight_decay), params, grads)
    assert_trees_close(ours, expected, **FP32_TOL)
    ours, _ = run(pallas_kernels.sgd(learning_rate, 0.9, block_sizes=SMALL_BLOCKS, interpret=True), params, grads)
    assert_trees_close(ours, run(optax.sgd(learning_rate, 0.9), params, grads)[0], **FP32_TOL)


def test_factories_keep_optax_signatures():
    """One factory builds every optimizer with optax's names and defaults (optax's dtype options left out)."""
    for name, (factory, reference, optax_factory, _) in OPTIMIZERS.items():
        theirs = inspect.signature(optax_factory).parameters
        for impl, ours in (("pallas", inspect.signature(factory)), ("reference", inspect.signature(reference))):
            hyper = [p for p in ours.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
            assert [p.name for p in hyper] == [p for p in theirs if p in ours.parameters], (name, impl)
            assert all(p.default == theirs[p.name].default for p in hyper), (name, impl)
            assert ("interpret" in ours.parameters) == (impl == "pallas")
    tx = pallas_kernels.sgd(LR, 0.9, True, block_sizes=SMALL_BLOCKS, interpret=True)  # positional, like optax.sgd
    ours, _ = run(tx, make_tree(0), grad_sequence())
    assert_trees_close(ours, run(optax.sgd(LR, 0.9, True), make_tree(0), grad_sequence())[0], **FP32_TOL)
    with pytest.raises(TypeError, match="interpret"):
        pallas_kernels.adamw_reference(LR, interpret=True)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_weight_decay_mask(name):
    factory, _, optax_factory, _ = OPTIMIZERS[name]
    mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731 - decay matrices only
    params, grads = make_tree(0), grad_sequence()
    ours, _ = run(factory(LR, weight_decay=0.5, mask=mask, block_sizes=SMALL_BLOCKS, interpret=True), params, grads)
    expected, _ = run(optax_factory(LR, weight_decay=0.5, mask=mask), params, grads)
    assert_trees_close(ours, expected, **FP32_TOL)
    unmasked, _ = run(optax_factory(LR, weight_decay=0.5), params, grads)
    assert not np.allclose(np.asarray(ours["vec"]), np.asarray(unmasked["vec"]), rtol=1e-5)


def test_composes_with_optax_chain():
    params, grads = make_tree(0), grad_sequence()
    ours, _ = run(optax.chain(optax.clip_by_global_norm(1.0), pallas_tx("adamw")), params, grads)
    expected, _ = run(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.1)), params, grads)
    assert_trees_close(ours, expected, **FP32_TOL)


# ---------------------------------------------------------------- blocking


@pytest.mark.parametrize("size", [0, 1, 7, 128, 129, 1000, 8 * 128, 8 * 128 + 1, 3 * 8 * 128])
def test_block_view_round_trip(size):
    view = blocking.BlockView.of(size, SMALL_BLOCKS)
    x = jnp.arange(size, dtype=jnp.float32)
    blocks = view.to_blocks(x)
    assert blocks.shape == (view.rows, blocking.LANES) and view.rows % view.block_rows == 0
    assert view.block_rows <= SMALL_BLOCKS.block_rows
    np.testing.assert_array_equal(view.from_blocks(blocks, (size,)), x)
    assert float(jnp.sum(blocks)) == float(jnp.sum(x))  # padding is zeros
    assert view.padded == (size != view.rows * blocking.LANES)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        pallas_kernels.BlockSizes(block_rows=24)


def test_bench_script_runs(tmp_path):
    """scripts/bench_optimizer.py runs end to end on CPU (interpreted Pallas) and writes its JSON."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_optimizer.py"
    spec = importlib.util.spec_from_file_location("bench_optimizer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--params", "200_000", "--steps", "1", "--optimizer", "lamb", "--json", str(out)])
    assert set(report["paths"]) == {"pallas", "optax", "jnp_reference"}
    assert report["copy_bytes_per_second"] > 0 and out.exists()
