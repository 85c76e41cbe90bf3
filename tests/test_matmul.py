"""Matmuls: the bf16 einsum's upcast route equals the native bf16 dots (values and gradients), and the
CPU matmul probe that picks the route is measured once per CPU and cached."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx import flops, matmul


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
        monkeypatch.setattr(matmul, "cpu_bf16_dots_upcast", lambda: upcast)
        assert matmul.upcast_bf16_dots_here() is upcast
        out, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b), a, b)
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
    monkeypatch.setattr(matmul, "_PROBES", {})
    calls = []

    def fake_probe():
        calls.append(1)
        return {"native": 1e9, "upcast": 2e9, "flops": 2e9}

    monkeypatch.setattr(matmul, "measure_cpu_peak", fake_probe)
    assert matmul.cpu_peak_flops() == 2e9 and matmul.cpu_bf16_dots_upcast()
    assert flops.peak_flops(jax.devices("cpu")) == 2e9  # MFU's CPU peak is the probe's
    assert matmul.cpu_peak_flops() == 2e9 and len(calls) == 1  # cached in this process
    monkeypatch.setattr(matmul, "_PROBES", {})
    assert matmul.cpu_peak_flops() == 2e9 and len(calls) == 1  # and in the file, for the next one
    monkeypatch.setattr(matmul, "_cpu_identity", lambda: "another CPU|avx512f amx_bf16")
    matmul.cpu_peak_flops()
    assert len(calls) == 2  # a different CPU probes again


def test_measured_cpu_peak_is_the_faster_of_both_paths():
    probe = matmul.measure_cpu_peak(size=256, repeats=2)
    assert probe["native"] > 0 and probe["upcast"] > 0
    assert probe["flops"] == max(probe["native"], probe["upcast"])
