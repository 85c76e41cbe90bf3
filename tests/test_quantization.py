"""Quantization: weights stored as int8/int4/fp8 (`llmx.quantize`, read by evaluate and generate) and
quantization-aware training (`model.quantization`) at the one matmul entry point, under ZeRO-3 and
tensor parallelism; bad input is one line and exit status 2 with nothing written."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import SMALL, small_config
from llmx import config as config_lib
from llmx import mesh as mesh_lib
from llmx import quantization as q
from llmx import quantize as quantize_lib
from llmx.cli import run as run_cli
from llmx.evaluate import run_evaluation
from llmx.matmul import einsum
from llmx.run import restore_run
from llmx.step import build_steps, loss_sums
from llmx.train import main as train_main

AXES = {
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "w_down": ("layers", "mlp", "embed"),
    "unembed": ("embed", "vocab"),
    "embed": ("vocab", "embed"),
}


def test_contracted_axes_are_the_ones_the_matmul_sums_over():
    assert {k: q.contracted_axes(v) for k, v in AXES.items()} == {
        "wq": (1,), "wo": (1, 2), "w_down": (1,), "unembed": (0,), "embed": (1,)}  # embed: a scale per row
    assert not q.is_matmul_weight(("layers", "embed")) and q.is_matmul_weight(("embed", "vocab"))


@pytest.mark.parametrize("weight_format,group,scale_shape", [
    ("int8", 0, (2, 1, 4, 8)), ("int4", 4, (2, 4, 4, 8)), ("fp8", 0, (2, 1, 4, 8))])
def test_a_weight_is_stored_with_a_scale_per_output_channel_and_group(weight_format, group, scale_shape):
    w = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))  # (L, D, H, Dh) like wq
    stored = q.quantize_weight(w, AXES["wq"], weight_format=weight_format, group=group)
    assert stored.qvalue.dtype == q.WEIGHT_TYPES[weight_format] and stored.scale.shape == scale_shape
    error = np.abs(np.asarray(qwix.dequantize(stored)) - np.asarray(w))
    scale = np.repeat(np.asarray(stored.scale), 16 // scale_shape[1], axis=1)
    if weight_format == "fp8":
        assert (error <= np.abs(np.asarray(w)) * 2.0**-4 + scale * 2.0**-9).all()  # e4m3: 3 mantissa bits
    else:
        assert (error <= scale / 2 + 1e-6).all()  # round to nearest: half a step
    # absmax scaling: the largest weight of each channel (and group) lands on the grid's end, [-127, 127]
    # and [-7, 7] used symmetrically
    qmax = {"int8": 127, "int4": 7, "fp8": 448}[weight_format]
    assert np.asarray(stored.scale) == pytest.approx(
        np.abs(np.asarray(w)).reshape(2, scale_shape[1], -1, 4, 8).max(axis=2) / qmax,
        rel=1e-6)


def test_a_group_that_does_not_divide_the_width_is_refused():
    with pytest.raises(config_lib.ConfigError, match="--group 32 does not divide the mlp width 688 of w; use a divisor of 688 such as 16 or 8"):
        q.check_group(("layers", "mlp", "embed"), (2, 688, 256), 32, name="w")


def _operands(dtype=jnp.float32):
    kx, kw = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (2, 3, 16), dtype), jax.random.normal(kw, (16, 4, 8))  # x (B,T,D), wq (D,H,Dh)


def test_stored_weights_multiply_as_their_dequantized_values():
    x, w = _operands()
    stored = q.quantize_weight(w, ("embed", "heads", "head_dim"), weight_format="int8")
    want = jnp.einsum("btd,dhk->bthk", x, qwix.dequantize(stored))
    np.testing.assert_allclose(einsum("btd,dhk->bthk", x, stored), want, rtol=1e-6, atol=1e-6)


def test_with_int8_activations_the_product_is_int8_by_int8_to_int32():
    x, w = _operands()
    stored = q.quantize_weight(w, ("embed", "heads", "head_dim"), weight_format="int8")

    def product(x, stored):
        with q.mode("int8"):  # a QAT int8 run quantized to int8: activations per token too
            return einsum("btd,dhk->bthk", x, stored)

    hlo = jax.jit(product).lower(x, stored).as_text()
    assert any("xi8>" in line and "-> tensor<" in line and "xi32>" in line.split("->")[-1]
               for line in hlo.splitlines() if "dot_general" in line), hlo
    want = jnp.einsum("btd,dhk->bthk", q.fake_quant(x, jnp.int8, (0, 1)), qwix.dequantize(stored))
    np.testing.assert_allclose(product(x, stored), want, rtol=1e-5, atol=1e-5)


def test_int8_qat_is_fake_quantized_forward_and_straight_through_backward():
    x, w = _operands()

    def loss(x, w, mode):
        with q.mode(mode):
            return jnp.sum(jnp.sin(einsum("btd,dhk->bthk", x, w)))

    # One jit for the reference operands and the gradients: each channel's absmax lands on a rounding tie
    # (qwix scales int8 by absmax / 127.5), which separately compiled divisions can round either way.
    @jax.jit
    def run(x, w):
        xq, wq = q.fake_quant(x, jnp.int8, (0, 1)), q.fake_quant(w, jnp.int8, (1, 2))  # per token, per channel
        return xq, wq, loss(x, w, "int8"), jax.grad(loss, argnums=(0, 1))(x, w, "int8")

    xq, wq, value, (gx, gw) = run(x, w)
    assert len(np.unique(np.asarray(xq[0, 0]))) <= 255 and not np.allclose(xq, x)
    np.testing.assert_allclose(value, jnp.sum(jnp.sin(jnp.einsum("btd,dhk->bthk", xq, wq))), rtol=1e-6)
    g = jnp.cos(jnp.einsum("btd,dhk->bthk", xq, wq))  # d loss / d out
    np.testing.assert_allclose(gx, jnp.einsum("bthk,dhk->btd", g, wq), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, jnp.einsum("btd,bthk->dhk", xq, g), rtol=1e-5, atol=1e-6)


def test_fp8_qat_is_e4m3_forward_and_e5m2_gradients():
    x, w = _operands()

    def loss(x, w):
        with q.mode("fp8"):
            return jnp.sum(jnp.sin(einsum("btd,dhk->bthk", x, w)) * 1000.0)

    @jax.jit  # one compilation for the reference operands and the gradients (see the int8 test)
    def run(x, w):
        xq, wq = q.fake_quant(x, jnp.float8_e4m3fn), q.fake_quant(w, jnp.float8_e4m3fn)
        return xq, wq, jax.grad(loss, argnums=(0, 1))(x, w)

    xq, wq, (gx, gw) = run(x, w)
    scale = np.abs(np.asarray(x)).max() / 448.0
    on_grid = np.asarray(xq) / scale
    np.testing.assert_array_equal(on_grid.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), on_grid.astype(np.float32))
    g = jnp.cos(jnp.einsum("btd,dhk->bthk", xq, wq)) * 1000.0
    g8 = qwix.dequantize(q.quantize(g, jnp.float8_e5m2))  # the gradient rounded to e5m2, per tensor
    assert not np.allclose(g8, g, rtol=1e-4)
    np.testing.assert_allclose(gx, jnp.einsum("bthk,dhk->btd", g8, wq), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw, jnp.einsum("btd,bthk->dhk", xq, g8), rtol=1e-5, atol=1e-4)


def test_qat_covers_every_projection_and_leaves_attention_dots_alone(monkeypatch):
    cfg = config_lib.load(None, [*SMALL, "model.quantization=int8", "model.scan_layers=true"])
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    seen = []
    inner = q.QAT_EINSUMS["int8"]
    monkeypatch.setitem(q.QAT_EINSUMS, "int8", lambda spec, x, w, f: seen.append(spec) or inner(spec, x, w, f))
    batch = _batch(2)
    jax.eval_shape(lambda p: loss_sums(p, steps.graphdef, batch), steps.abstract_state.params)
    # q, k, v, o, gate, up, down (the scanned layer, traced once) and the output projection
    assert sorted(seen) == sorted(["btd,dhk->bthk", "btd,dnk->btnk", "btd,dnk->btnk", "bthk,hkd->btd",
                                   "btd,df->btf", "btd,df->btf", "btf,fd->btd", "btd,dv->btv"])


def _batch(rows: int, seq: int = 32) -> dict:
    tokens = jax.random.randint(jax.random.key(2), (rows, seq), 3, 300)
    return {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "segment_ids": jnp.ones_like(tokens),
            "positions": jnp.broadcast_to(jnp.arange(seq), tokens.shape), "loss_mask": jnp.ones_like(tokens)}


def _grads(overrides, devices):
    cfg = config_lib.load(None, [*SMALL, *overrides])
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
    params = steps.init().params
    batch = jax.device_put(_batch(16), steps.eval_batch_shardings)

    def grads(params, batch):
        with mesh_lib.activation_sharding(steps.mesh):
            return jax.grad(lambda p: (lambda s, n: s / n)(*loss_sums(p, steps.graphdef, batch)))(params)

    return jax.device_get(jax.jit(grads, out_shardings=steps.grad_shardings)(params, batch))


@pytest.mark.slow
def test_int8_qat_gradients_under_zero3_and_tensor_parallel_equal_one_device():
    one = _grads(["model.quantization=int8"], jax.devices()[:1])
    eight = _grads(["model.quantization=int8", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=3"],
                   jax.devices())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), eight, one)


# (spec, x shape, x sharding, w shape, w sharding) of the projections, as ZeRO-3 x tensor parallelism
# splits them: the batch and the weights' embed axis over fsdp, heads and mlp over tensor.
PROJECTIONS = [
    ("btd,dhk->bthk", (8, 4, 16), P("fsdp"), (16, 4, 8), P("fsdp", "tensor")),  # wq
    ("bthk,hkd->btd", (8, 4, 4, 8), P("fsdp", None, "tensor"), (4, 8, 16), P("tensor", None, "fsdp")),  # wo
    ("btf,fd->btd", (8, 4, 32), P("fsdp", None, "tensor"), (32, 16), P("tensor", "fsdp")),  # w_down
]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_qat_projections_sharded_over_zero3_and_tensor_axes_equal_one_device(mode):
    """Each projection's QAT forward and gradients, operands split over fsdp x tensor, equal one device's
    to 1e-5: the scales are taken over the whole logical arrays, not per shard. (A whole model is
    compared for int8 above; for fp8 a whole model is not comparable to 1e-5: the partial sums of
    sharded matmuls are added in another order, and where a value then rounds to the other side of an
    fp8 step, e5m2's 2 mantissa bits move that gradient element by up to 25 %, and every gradient
    downstream of it with it.)"""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    for i, (spec, x_shape, x_spec, w_shape, w_spec) in enumerate(PROJECTIONS):
        kx, kw = jax.random.split(jax.random.key(i))
        x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)

        def value_and_grads(x, w):
            def loss(x, w):
                with q.mode(mode):
                    return jnp.sum(jnp.sin(einsum(spec, x, w)))
            return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

        one = jax.jit(value_and_grads)(x, w)
        shardings = (NamedSharding(mesh, x_spec), NamedSharding(mesh, w_spec))
        eight = jax.jit(value_and_grads, in_shardings=shardings)(*(jax.device_put(a, s) for a, s in zip((x, w), shardings)))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), eight, one)
        plain = jax.grad(lambda w: jnp.sum(jnp.sin(einsum(spec, x, w))))(w)
        assert not np.allclose(plain, one[1][1], rtol=1e-3)  # the QAT gradient is not the plain one


# ---------------------------------------------------------------- llmx.quantize on a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    from llmx.train import train

    tmp = tmp_path_factory.mktemp("ptq")
    cfg = small_config(tmp, data_dir, "train.steps=30", "model.d_model=64", "model.d_ff=128",
                       "optim.lr=1e-2", "checkpoint.every=0")
    train(cfg, devices=jax.devices()[:1])
    return cfg


@pytest.fixture(scope="module")
def float_run(trained):
    """The trained float run reopened, and its eval loss."""
    return restore_run(run_dir=str(trained.train.run_dir)), run_evaluation(run_dir=str(trained.train.run_dir))[1][0].loss


def _listing(path):
    path = Path(path)
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("weight_format,group,max_ratio,max_loss_change", [
    ("int8", 0, 0.27, 0.01), ("int4", 16, 0.19, 0.05), ("fp8", 0, 0.27, 0.02)])
@pytest.mark.slow
def test_quantize_writes_a_run_evaluate_and_generate_read(trained, float_run, tmp_path, capsys, weight_format, group,
                                                          max_ratio, max_loss_change):
    source = trained.train.run_dir
    before = _listing(source)
    out = tmp_path / f"q-{weight_format}"
    args = ["--run-dir", str(source), "--to", weight_format, "--out", str(out)] + (["--group", str(group)] if group else [])
    assert run_cli(lambda: quantize_lib.main(args)) == 0
    assert capsys.readouterr().out.startswith(f"{out}: {weight_format} weights")
    assert _listing(source) == before  # the source run is only read
    report = json.loads((out / "quantization.json").read_text())
    assert report["parameter_bytes"]["ratio"] <= max_ratio and report["group"] == group
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "quantization.json"]

    run = restore_run(run_dir=str(out))
    wq = run.params["blocks"]["attn"]["wq"].get_value()
    assert isinstance(wq, q.QArray) and wq.qvalue.dtype == q.WEIGHT_TYPES[weight_format]
    assert wq.qvalue.shape == (2, 64, 4, 16)  # the stacked layers axis is kept
    source_run, base_loss = float_run
    _, (quantized,) = run_evaluation(run_dir=str(out))
    assert abs(quantized.loss / base_loss - 1) <= max_loss_change, (base_loss, quantized.loss)
    agree = quantize_lib.agreement(source_run, run, [[1, 100, 101, 32]], new_tokens=24)
    assert agree["tokens"] == 24 and agree["teacher_forced"] >= 0.8, agree


def test_a_quantized_run_loads_on_a_zero3_tensor_parallel_mesh(trained, tmp_path):
    out = tmp_path / "q"
    quantize_lib.quantize_run(run_dir=str(trained.train.run_dir), weight_format="int8", out=str(out))
    one = run_evaluation(run_dir=str(out), single_device=True)[1][0].loss
    mesh = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=3",
            "train.micro_batch_size=2"]  # the single device's 8 rows per eval batch
    run, (result,) = run_evaluation(run_dir=str(out), overrides=mesh)
    assert run.steps.mesh.shape["tensor"] == 2
    values = run.params["blocks"]["attn"]["wq"].get_value().qvalue  # (L, D, H, Dh): D over fsdp, H over tensor
    assert values.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert result.loss == pytest.approx(one, rel=1e-5)


def _fails(main, args, capsys) -> str:
    assert run_cli(lambda: main(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(trained, tmp_path, capsys, data_dir):
    source = str(trained.train.run_dir)
    before = _listing(tmp_path)
    assert "is not a run directory" in _fails(quantize_lib.main, ["--run-dir", str(tmp_path / "nope"), "--to", "int8"], capsys)
    assert "--to 'int3' is not a weight format; choose one of: int8, int4, fp8" in _fails(
        quantize_lib.main, ["--run-dir", source, "--to", "int3", "--out", str(tmp_path / "a")], capsys)
    assert "--group 48 does not divide the embed width 64" in _fails(
        quantize_lib.main, ["--run-dir", source, "--to", "int4", "--group", "48", "--out", str(tmp_path / "b")], capsys)
    (tmp_path / "taken").mkdir()
    assert "exists; llmx.quantize never overwrites" in _fails(
        quantize_lib.main, ["--run-dir", source, "--to", "int8", "--out", str(tmp_path / "taken")], capsys)
    assert "inside the source run" in _fails(
        quantize_lib.main, ["--run-dir", source, "--to", "int8", "--out", f"{source}/int8"], capsys)
    err = _fails(train_main, [*SMALL, f"train.run_dir={tmp_path / 'pruned'}", f"data.cache_dir={data_dir}",
                              "optim.prune_method=magnitude", "optim.prune_begin_step=10", "optim.prune_end_step=5"], capsys)
    assert err == ("error: optim.prune_end_step=5 is before optim.prune_begin_step=10; "
                   "set optim.prune_end_step >= optim.prune_begin_step")
    assert [name for name, *_ in _listing(tmp_path)] == sorted([name for name, *_ in before] + ["taken"])


def test_a_quantized_run_is_not_trained(trained, tmp_path, capsys, data_dir):
    out = tmp_path / "q"
    quantize_lib.quantize_run(run_dir=str(trained.train.run_dir), weight_format="fp8", out=str(out))
    err = _fails(train_main, ["--config", str(out / "config.yaml"), f"data.cache_dir={data_dir}"], capsys)
    assert err.startswith("error: model.weight_format=fp8: quantized weights are for llmx.evaluate")
    assert run_cli(lambda: quantize_lib.main(["--run-dir", str(out), "--to", "int8"])) == 2
    assert "already holds fp8 weights" in capsys.readouterr().err
