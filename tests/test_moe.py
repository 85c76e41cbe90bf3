"""The mixture of experts (llmx.models.moe, the mixtral family): grouped matmuls against a dense one-hot
reference, capacity and drops, the load-balancing loss against transformers', and expert parallelism on
the 8-device mesh against one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx import config as config_lib
from llmx import mesh as mesh_lib
from llmx.models import moe
from llmx.plan import collective_counts
from llmx.step import build_steps

TINY_MOE = [
    "model.family=mixtral", "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=16", "model.n_experts=8", "model.experts_per_token=2",
    "model.router_z_loss_coef=0.001", "optim.warmup_steps=0",
]


def _cfg(*overrides):
    return config_lib.load(None, [*TINY_MOE, *overrides])


def _problem(n=24, d=16, f=24, e=4, k=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n, d))
    logits = jax.random.normal(keys[1], (n, e))
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits), k)
    weights = weights / weights.sum(-1, keepdims=True)
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) / d**0.5 for kk in keys[2:4])
    w_down = jax.random.normal(keys[4], (e, f, d)) / f**0.5
    return x, experts, weights, (w_gate, w_up, w_down)


def _reference(x, experts, weights, w_gate, w_up, w_down):
    """Every expert on every token, combined by one-hot routing weights."""
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
    out = jnp.einsum("nef,efd->ned", h, w_down)  # (N, E, D)
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, w_gate.shape[0]))
    return jnp.einsum("ne,ned->nd", combine, out)


@pytest.mark.parametrize("impl", ["dense", "ragged", "megablox"])
def test_experts_equal_dense_one_hot_reference_forward_and_gradients(impl):
    x, experts, weights, w = _problem()
    cfg = _cfg("model.n_experts=4", f"model.moe_impl={impl}").model

    def loss(fn, x, weights, w):
        y = fn(x, experts, weights, *w)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))  # a loss that weighs every output

    run = lambda *a: moe.run_experts(*a, cfg=cfg)[0]  # noqa: E731
    # Compiled, both sides: op by op, the backward's eager ops took most of the test's 5-7 s to compile.
    np.testing.assert_allclose(jax.jit(run)(x, experts, weights, *w), jax.jit(_reference)(x, experts, weights, *w),
                               rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, run), argnums=(0, 1, 2)))(x, weights, w)
    expected = jax.jit(jax.grad(functools.partial(loss, _reference), argnums=(0, 1, 2)))(x, weights, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected)


def test_capacity_large_enough_equals_dropless_and_small_drops():
    x, experts, weights, w = _problem(n=32, e=4)
    dropless, dropped = moe.run_experts(x, experts, weights, *w, cfg=_cfg("model.n_experts=4", "model.moe_impl=ragged").model)
    assert not dropped.any()
    # factor E/k: C = N slots per expert, so nothing can overflow
    roomy, roomy_dropped = moe.run_experts(x, experts, weights, *w, cfg=_cfg("model.n_experts=4", "model.moe_capacity_factor=2").model)
    np.testing.assert_allclose(roomy, dropless, rtol=1e-5, atol=1e-6)
    assert not roomy_dropped.any()
    tight, tight_dropped = moe.run_experts(x, experts, weights, *w, cfg=_cfg("model.n_experts=4", "model.moe_capacity_factor=0.5").model)
    # 0.5 x 32 x 2 / 4 = 8 slots per expert: each expert keeps its first 8 assignments (first choices first)
    counts = np.bincount(np.asarray(experts).T.reshape(-1), minlength=4)
    assert int(tight_dropped.sum()) == int(np.maximum(counts - 8, 0).sum()) > 0
    # a dropped assignment contributes nothing: the reference with those weights zeroed
    kept_weights = jnp.where(tight_dropped, 0.0, weights)
    np.testing.assert_allclose(tight, _reference(x, experts, kept_weights, *w), rtol=1e-5, atol=1e-5)


def test_model_reports_dropped_fraction():
    cfg = _cfg("model.moe_capacity_factor=0.5", "train.micro_batch_size=4")
    metrics = _train(cfg, jax.devices()[:1], steps=1)[1][0]
    assert 0 < metrics["dropped_fraction"] < 1
    assert metrics["expert_load_max"] >= metrics["expert_load_mean"] == 4 * 16 * 2 / 8


def test_load_balancing_loss_equals_transformers():
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    L, N, E, k = 3, 40, 8, 2
    logits = np.random.default_rng(0).normal(size=(L, N, E)).astype(np.float32)
    expected = mixtral.load_balancing_loss_func(tuple(torch.from_numpy(layer) for layer in logits), E, k)
    probs = jax.nn.softmax(logits, axis=-1)
    _, top = jax.lax.top_k(probs, k)
    counts = jax.nn.one_hot(top, E).sum((1, 2))  # (L, E), the sums MoE.__call__ returns per layer
    ours = moe.load_balancing_loss(counts, probs.sum(1), jnp.full((L,), N, jnp.float32), E)
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-6)


def _batches(cfg, steps, rows=16):
    rng = np.random.default_rng(1)
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    for _ in range(steps):
        tokens = rng.integers(0, V, (1, rows, T + 1))
        yield {
            "inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32),
            "segment_ids": np.ones((1, rows, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, rows, T)).copy(),
            "loss_mask": np.ones((1, rows, T), np.float32),
        }


def _train(cfg, devices, *, steps):
    steps_ = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    state = steps_.init()
    history = []
    for batch in _batches(cfg, steps, rows=cfg.train.micro_batch_size * (len(devices) // max(1, cfg.mesh.tensor))):
        state, metrics = steps_.train(state, jax.device_put(batch, steps_.batch_shardings))
        history.append({k: float(v) for k, v in metrics.items()})
    return steps_, history, jax.device_get(state.params)


@pytest.fixture(scope="module")
def one_device_run():
    cfg = _cfg("model.moe_impl=dense", "train.micro_batch_size=16")
    return _train(cfg, jax.devices()[:1], steps=20)


LAYOUTS = {
    "expert=4 fsdp=2": ["mesh.data=1", "mesh.expert=4", "mesh.fsdp=2", "train.micro_batch_size=2"],
    "expert=2 tensor=2 fsdp=2 zero3": ["mesh.data=1", "mesh.expert=2", "mesh.tensor=2", "mesh.fsdp=2",
                                       "mesh.zero_stage=3", "train.micro_batch_size=4"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_expert_parallel_trains_like_one_device_with_all_to_alls(layout, one_device_run):
    cfg = _cfg("model.moe_impl=dense", *LAYOUTS[layout])
    steps_, history, params = _train(cfg, jax.devices(), steps=20)
    _, ref_history, ref_params = one_device_run
    for name in ("loss", "aux_loss", "z_loss"):
        np.testing.assert_allclose([m[name] for m in history], [m[name] for m in ref_history], rtol=1e-5, err_msg=name)
    # tensor parallelism sums each expert's hidden slices in another order: a few 1e-6 after 20 Adam steps
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), params, ref_params)
    batch = jax.device_put(next(_batches(cfg, 1, rows=16)), steps_.batch_shardings)
    hlo = steps_.train.lower(steps_.init(), batch).compile().as_text()
    assert collective_counts(hlo).get("all-to-all", 0) >= 2 * cfg.model.n_layers  # dispatch and return per layer


@pytest.mark.slow
def test_dropless_expert_parallel_gathers_and_scatters_like_one_device(one_device_run):
    cfg = _cfg("model.moe_impl=ragged", *LAYOUTS["expert=4 fsdp=2"])
    _, history, _ = _train(cfg, jax.devices(), steps=3)
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in one_device_run[1][:3]], rtol=1e-5)


@pytest.mark.parametrize("stage", [0, 3])
def test_plan_accounts_expert_shards(stage):
    from llmx.plan import expert_bytes, state_memory

    cfg = _cfg("mesh.data=1", "mesh.expert=4", "mesh.fsdp=2", f"mesh.zero_stage={stage}", "train.micro_batch_size=2")
    steps_ = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()))
    L, E, D, F = 2, 8, 32, 48
    assert expert_bytes(steps_.abstract_state.params) == 4 * L * E * 3 * D * F
    memory = state_memory(cfg, steps_)
    assert memory.params == pytest.approx(memory.expected_params, rel=0.02)
    assert memory.opt_state == pytest.approx(memory.expected_opt_state, rel=0.02)


def test_flops_count_the_active_experts_only():
    from flax import nnx

    from llmx import models

    cfg = _cfg().model
    # Shapes only (nnx.eval_shape): the count needs no initialised weights, so no init ops to compile.
    model = nnx.eval_shape(lambda: models.get("mixtral").build(cfg, rngs=nnx.Rngs(0)))
    sizes = {"/".join(map(str, path)): v.size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    total = sum(sizes.values())
    norms = sum(n for name, n in sizes.items() if "norm" in name)
    experts = sum(n for name, n in sizes.items() if name.split("/")[-1] in ("w_gate", "w_up", "w_down"))
    inactive = experts * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts
    family = models.get("mixtral")
    # embed (lookup, no matmul) and unembed both V x D: the lookup is left out
    assert family.matmul_params(cfg) == total - norms - cfg.vocab_size * cfg.d_model - inactive
    assert family.flops_per_token(cfg) == 6 * family.matmul_params(cfg) + 6 * 2 * 4 * 8 * 16


@pytest.mark.parametrize("overrides, message", [
    (["model.experts_per_token=9"], "model.experts_per_token=9 exceeds model.n_experts=8"),
    (["mesh.expert=3"], "model.n_experts=8 is not divisible by mesh.expert=3; use a divisor of 8"),
    (["model.moe_impl=sparse"], "model.moe_impl='sparse' is not allowed; choose one of: auto, ragged, megablox, dense"),
    (["mesh.pipeline=2", "train.grad_accum_steps=2"], "mesh.pipeline=2 is not implemented for model.family=mixtral"),
    (["model.moe_capacity_factor=0"], "model.moe_capacity_factor=0.0 must be > 0, or -1"),
])
def test_bad_moe_config_is_a_one_line_error(overrides, message):
    from llmx.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_kv_cache_decoding_equals_the_full_forward():
    from flax import nnx

    from llmx.models.mixtral import Mixtral

    cfg = _cfg("model.seq_len=32", "model.init_std=0.3", "model.moe_impl=ragged").model
    model = Mixtral(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    graphdef, params = nnx.split(model)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    ones = jnp.ones((2, 9), jnp.int32)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        full = model(tokens)  # (B, T, V)
        prefill, cache = model.decode(tokens[:, :8], model.init_cache(2, 16), segment_ids=ones[:, :8],
                                      positions=positions[:, :8], index=0)
        step, _ = model.decode(tokens[:, 8:], cache, segment_ids=ones[:, 8:], positions=positions[:, 8:], index=8)
        return full, prefill, step

    full, prefill, step = run(params)
    np.testing.assert_allclose(prefill, full[:, :8], atol=1e-5)
    np.testing.assert_allclose(step[:, 0], full[:, 8], atol=1e-5)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` by its documented semantics, from all-gathers (XLA:CPU lacks the op)."""
    del recv_sizes  # implied by the senders' sizes
    me, ep = jax.lax.axis_index(axis_name), jax.lax.psum(1, axis_name)
    data = jax.lax.all_gather(operand, axis_name)  # (ep, M, D)
    starts, sizes, lands = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(output.shape[0])
    for source in range(ep):
        land, size, start = lands[source, me], sizes[source, me], starts[source, me]
        inside = (rows >= land) & (rows < land + size)
        output = jnp.where(inside[:, None], data[source][jnp.clip(rows - land + start, 0, operand.shape[0] - 1)], output)
    return output


@pytest.mark.slow
def test_dropless_ragged_all_to_all_exchange_trains_like_one_device(one_device_run, monkeypatch):
    """The TPU/GPU exchange's offsets and sizes, run on CPU with an emulated ragged_all_to_all."""
    monkeypatch.setattr(moe, "dropless_exchange", lambda platform: "ragged_all_to_all")
    monkeypatch.setattr(moe, "ragged_all_to_all", _emulated_ragged_all_to_all)
    cfg = _cfg("model.moe_impl=ragged", *LAYOUTS["expert=4 fsdp=2"])
    _, history, _ = _train(cfg, jax.devices(), steps=3)
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in one_device_run[1][:3]], rtol=1e-5)


@pytest.mark.slow
def test_megablox_expert_parallel_gradients_like_one_device(one_device_run):
    """The Pallas kernel (interpreted) inside the expert-parallel shard_map: rows of other devices' experts
    sit past its groups, where the kernel writes nothing, forward or backward."""
    cfg = _cfg("model.moe_impl=megablox", *LAYOUTS["expert=4 fsdp=2"])
    _, history, _ = _train(cfg, jax.devices(), steps=2)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[name] for m in history], [m[name] for m in one_device_run[1][:2]], rtol=1e-5)
