"""The CPU weight-gradient kernel (llmx/weight_grad_cpu.cc): dW = X^T G against fp64 maths of the same bf16
operands, through `llmx.matmul.einsum`'s backward against XLA's dots, and where it is taken (one CPU
device, bf16, plain projections, the probe) and where not (TPU/GPU targets, several devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx import matmul, mesh as mesh_lib, native, weight_grad


def _needs_kernel():
    if not weight_grad.available():
        pytest.skip(f"the CPU weight-gradient kernel is unavailable here: {weight_grad._load()[1]}")


@pytest.mark.parametrize("rows, M, N", [
    (2048, 256, 688),  # the bench model's MLP: full panels of 64 columns and one of 48
    (9, 13, 16),  # an odd row count (the last pair is padded with zero), 6 + 6 + 1 rows, one vector
    (2 * 1100 + 1, 70, 80),  # three chunks of row pairs; 70 = 48 + 6 * 3 + 4 rows; a panel of 64 and one of 16
    (4, 1, 32),  # one row of dW
    (600, 16, 4112),  # M + N past the 4 MiB packing buffer: chunks of 254 pairs
])
def test_kernel_equals_fp64_maths_of_the_bf16_operands(rows, M, N):
    _needs_kernel()
    kx, kg = jax.random.split(jax.random.key(rows))
    x = jax.random.normal(kx, (rows, M), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (rows, N), jnp.float32).astype(jnp.bfloat16)
    out = jax.jit(lambda x, g: weight_grad.weight_grad("rk,kn->rn", x, g, (M, N)))(x, g)
    exact = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    assert out.dtype == jnp.float32 and out.shape == (M, N)
    # fp32 sums of exact bf16 products: the error is the sums' rounding, ~rows * 2^-24 of the magnitudes.
    scale = np.abs(np.asarray(x, np.float64)).T @ np.abs(np.asarray(g, np.float64))
    assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= 1e-6 * (rows + 16) * scale + 1e-30)


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,df->btf", (2, 6, 32), (32, 48)),  # the MLP's projections
    ("btd,dhk->bthk", (2, 6, 32), (32, 2, 16)),  # into heads (w is (D, H * K) in memory)
    ("bthk,hkd->btd", (2, 6, 2, 16), (2, 16, 32)),  # out of heads: two contracted indices
])
def test_einsum_backward_through_the_kernel_equals_xla(monkeypatch, spec, x_shape, w_shape):
    """`matmul.einsum`'s bf16 backward with the kernel gives the gradients XLA's dots give (the same bf16
    products summed in fp32, in another order), and the compiled backward calls the kernel."""
    _needs_kernel()
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, w_shape, jnp.float32)  # an fp32 master weight, cast inside
    g = jax.random.normal(kg, jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape, jnp.float32)
    monkeypatch.setattr(weight_grad, "probe", lambda: {"kernel": 1.0, "xla": 2.0})

    def grads(kernel: bool):
        monkeypatch.setattr(weight_grad, "takes", (lambda *a: kernel) if not kernel else TAKES)
        fn = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: matmul.einsum(spec, x, w), x, w)[1](g))
        return fn(x, w, g), fn.lower(x, w, g).compile().as_text()

    (dx_k, dw_k), hlo_k = grads(True)
    (dx_x, dw_x), hlo_x = grads(False)
    assert weight_grad.TARGET in hlo_k and weight_grad.TARGET not in hlo_x
    assert dw_k.dtype == w.dtype and dw_k.shape == w.shape
    np.testing.assert_array_equal(np.asarray(dx_k), np.asarray(dx_x))  # x's gradient is XLA's either way
    np.testing.assert_allclose(np.asarray(dw_k), np.asarray(dw_x), rtol=1e-5, atol=1e-5)


TAKES = weight_grad.takes


def test_taken_for_bf16_projections_on_one_cpu_device_only(monkeypatch):
    """bf16, a (rows, K) x (K, N) projection with N a multiple of 16, traced for one CPU device, where the
    probe timed the kernel faster; an AOT compile for a TPU or GPU target (traced on this CPU host) and a
    mesh of several devices keep XLA's dots."""
    monkeypatch.setattr(weight_grad, "available", lambda: True)
    monkeypatch.setattr(weight_grad, "probe", lambda: {"kernel": 1.0, "xla": 2.0})
    assert weight_grad.split("btd,df->btf") == 1 and weight_grad.split("bthk,hkd->btd") == 2
    assert weight_grad.split("bqd,bsd->bqs") is None  # a batched dot (attention's scores)
    assert weight_grad.split("btd,fd->btf") is None  # w stored (N, K): not this kernel's layout
    assert weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 48))
    assert not weight_grad.takes("btd,df->btf", jnp.float32, (32, 48))
    assert not weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 40))  # N not a multiple of 16
    assert not weight_grad.takes("bqd,bsd->bqs", jnp.bfloat16, (2, 8, 4))
    with mesh_lib.activation_sharding(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1])):
        assert weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 48))
    with mesh_lib.activation_sharding(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:8])):
        assert not weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 48))
    for platform in ("tpu", "gpu"):
        monkeypatch.setattr(weight_grad.mesh_lib, "traced_platform", lambda platform=platform: platform)
        assert not weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 48))
    monkeypatch.undo()
    monkeypatch.setattr(weight_grad, "available", lambda: True)
    monkeypatch.setattr(weight_grad, "probe", lambda: {"kernel": 2.0, "xla": 1.0})
    assert not weight_grad.takes("btd,df->btf", jnp.bfloat16, (32, 48))  # XLA was faster here


def test_probe_runs_once_per_cpu_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(weight_grad, "_PROBES", {})
    calls = []
    monkeypatch.setattr(weight_grad, "measure", lambda: calls.append(1) or {"kernel": 1.0, "xla": 2.0})
    assert weight_grad.probe() == {"kernel": 1.0, "xla": 2.0} and len(calls) == 1
    weight_grad._PROBES.clear()  # a new process: the file answers
    assert weight_grad.probe() == {"kernel": 1.0, "xla": 2.0} and len(calls) == 1
    assert (tmp_path / "weight_grad_cpu" / "probe.json").exists()
    monkeypatch.setattr(weight_grad, "_key", lambda: "another CPU or source")
    weight_grad.probe()
    assert len(calls) == 2


def test_measure_times_both(monkeypatch):
    _needs_kernel()
    times = weight_grad.measure(shape=(2, 64, 32, 48), rounds=1, repeats=1)
    assert times.keys() == {"kernel", "xla"} and all(t > 0 for t in times.values())


def test_without_a_compiler_the_kernel_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert weight_grad._load.__wrapped__() == (False, "no C++ compiler found (set CXX or install g++)")
