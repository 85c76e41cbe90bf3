"""Matmuls: the bf16 einsum's upcast route equals the native bf16 dots (values and gradients), and the
CPU matmul probe that picks the route is measured once per CPU and cached."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx import flops, matmul

REPO = Path(__file__).resolve().parents[1]


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
    monkeypatch.setattr(matmul, "cpu_identity", lambda: "another CPU|avx512f amx_bf16")
    matmul.cpu_peak_flops()
    assert len(calls) == 2  # a different CPU probes again


def test_measured_cpu_peak_is_the_faster_of_both_paths():
    probe = matmul.measure_cpu_peak(size=256, repeats=2)
    assert probe["native"] > 0 and probe["upcast"] > 0
    assert probe["flops"] == max(probe["native"], probe["upcast"])


def _dots(hlo: str) -> list[dict]:
    """Every dot of an optimized HLO module: operand dtypes, whether it has batch dimensions, and the
    jax op it came from."""
    dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = []
    for line in hlo.splitlines():
        if m := re.search(r"= \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line):
            op = re.search(r'op_name="([^"]*)"', line)
            dots.append({"operands": (dtypes[m.group(1)], dtypes[m.group(2)]), "batched": "lhs_batch_dims" in line,
                         "backward": "transpose(" in (op.group(1) if op else ""), "op": op.group(1) if op else ""})
    return dots


def test_the_bf16_bench_step_runs_its_matmuls_as_bf16_dots():
    """The compiled bf16 step of the bench model (configs/bench_cpu.yaml) multiplies bf16 operands in every
    weight projection, forward and backward, and in the forward attention: an fp32 dot there would halve
    the speed silently. The exception is XLA:CPU's own: a batched dot that contracts its operand's second
    dimension (attention's backward P^T·dO, dO·V^T and dS^T·Q) has no bf16 kernel in its YNNPACK support
    (`IsDotSupportedByYnn` rejects non-canonical layouts), so XLA upcasts it to fp32 whatever the input
    says; that is at most 3 dots per attention block, and no more may appear. Weight gradients computed
    by llmx.weight_grad's kernel take bf16 operands by its signature."""
    if matmul.cpu_bf16_dots_upcast():
        pytest.skip("this CPU's probe runs bf16 matmuls as fp32 dots (no AVX512-BF16/AMX): nothing to check")
    from llmx import config as config_lib
    from llmx import mesh as mesh_lib
    from llmx.attention import causal_blocks
    from llmx.plan import compile_train_step
    from llmx.step import build_steps

    cfg = config_lib.load(str(REPO / "configs" / "bench_cpu.yaml"), ["train.precision=bf16"])
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    hlo = compile_train_step(cfg, steps).as_text()
    dots = _dots(hlo)
    wrong = [d["op"] for d in dots if d["operands"] != ("bf16", "bf16") and not (d["batched"] and d["backward"])]
    assert not wrong, f"{len(wrong)} fp32 dots in the bf16 step, e.g. {wrong[:3]}"
    projections = [d for d in dots if not d["batched"]]
    # The weight-gradient kernel (llmx.weight_grad, bf16 operands by its signature) where its probe won.
    kernel_calls = len(re.findall(r'custom_call_target="llmx_weight_grad_cpu"', hlo))
    # q, k, v, o, gate, up, down: forward and two grads
    assert len(projections) + kernel_calls >= 3 * 7 * cfg.model.n_layers
    upcast_by_xla = [d for d in dots if d["operands"] != ("bf16", "bf16")]
    assert len(upcast_by_xla) <= 3 * cfg.model.n_layers * causal_blocks(cfg.model.seq_len), upcast_by_xla


@pytest.mark.parametrize("platform, laid_out", [("cpu", True), ("tpu", False), ("gpu", False)])
def test_fp32_einsums_take_the_laid_out_vjp_on_cpu_only(monkeypatch, platform, laid_out):
    """The CPU-only choice keys off the platform being traced for: an AOT compile for a TPU or GPU target
    (traced on a CPU host) keeps the plain fp32 einsum its compilers lay out themselves."""
    monkeypatch.setattr(matmul.mesh_lib, "traced_platform", lambda: platform)
    x, w = jnp.ones((2, 8, 16), jnp.float32), jnp.ones((16, 24), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, w: matmul.einsum("btd,df->btf", x, w))(x, w))
    assert ("custom_vjp_call" in jaxpr) is laid_out, jaxpr
    grads = jax.grad(lambda x, w: matmul.einsum("btd,df->btf", x, w).sum(), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(grads[1], jnp.einsum("btd,btf->df", x, jnp.ones((2, 8, 24))), rtol=1e-6)
