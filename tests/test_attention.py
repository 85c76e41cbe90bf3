"""Attention kernels agree with a plain reference: xla here, splash in Pallas interpret mode here and
for real in an AOT compile for TPU, cuDNN and Triton in an AOT compile for H100 (no GPU needed). The TPU worker
also compiles the train step with `mesh.offload_optimizer` and checks the state rests in host memory.

AOT compiles run in a subprocess (`python tests/aot_attention_worker.py <target>`) with LLMX_AOT_PYTHON,
like tests/test_pallas_aot.py.
"""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import AOT_PYTHON, needs_extra

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def reference_attention(q, k, v, segment_ids):
    """The textbook form in fp32: repeat KV heads, mask, softmax. q (B, T, H, Dh), k, v (B, S, K, Dh)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    T = q.shape[1]
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def inputs(dtype, *, B=2, T=32, H=4, K=2, Dh=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, Dh)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, Dh)), dtype)
    # Packed documents: row 0 holds three, row 1 one.
    segments = jnp.asarray([[1] * (T // 4) + [2] * (T // 2) + [3] * (T - T // 4 - T // 2), [1] * T], jnp.int32)
    return q, k, v, segments


def check_forward_and_grads(fn, dtype, *, T=32, Dh=16):
    q, k, v, seg = inputs(dtype, T=T, Dh=Dh)
    weights = jnp.cos(jnp.arange(float(Dh)))
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, seg).astype(jnp.float32) * weights)  # noqa: E731
    out, ref = fn(q, k, v, seg), reference_attention(q, k, v, seg)
    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
    # Compiled gradients: op by op, the reference's backward compiled each eager op on its own (seconds a case).
    grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss(reference_attention), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T, blocks", [(32, 1), (256, 2), (384, 3), (512, 4)])
def test_xla_attention_matches_reference(dtype, T, blocks):
    """Also with the causal upper triangle skipped in 2, 3 and 4 query blocks (documents cross them)."""
    from llmx.attention import causal_blocks, xla_attention

    assert causal_blocks(T) == blocks
    check_forward_and_grads(jax.jit(xla_attention), dtype, T=T)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_attention_in_interpret_mode_matches_reference(dtype):
    from llmx.attention import splash_attention

    # The kernel's blocks are multiples of 128 lanes.
    check_forward_and_grads(jax.jit(lambda q, k, v, s: splash_attention(q, k, v, s, interpret=True)), dtype, T=128)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_attention_in_interpret_mode_matches_reference(dtype):
    """Two 128-row query blocks with documents crossing them, grouped-query heads repeated for the kernel."""
    from llmx.attention import triton_attention

    check_forward_and_grads(jax.jit(lambda q, k, v, s: triton_attention(q, k, v, s, interpret=True)), dtype, T=256)


@pytest.mark.parametrize("dtype, variant", [(jnp.float32, "native"), (jnp.bfloat16, "native"), (jnp.bfloat16, "wide")])
@pytest.mark.parametrize("T", [32, 100, 256])
def test_cpu_flash_attention_matches_reference(dtype, variant, T):
    """llmx's C++ kernel (built on first use), both builds (bf16 dot instructions where the CPU has them, and
    bf16 widened to fp32): grouped-query heads, documents crossing its 64-row tiles, a length that is not
    a multiple of the tile."""
    from llmx.attention import cpu

    assert cpu.available(), cpu.unavailable_reason()
    check_forward_and_grads(jax.jit(cpu.variant_attention(variant)), dtype, T=T)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("Dh", [48, 64])
def test_cpu_flash_attention_head_dims_matches_reference(dtype, Dh):
    """Head dims whose rows the kernel transposes 16 x 16 in registers (64), and partly so with the rest
    gathered (48: 24 column pairs of k, 48 columns of a query tile), at a length that is not a multiple of 16."""
    from llmx.attention import cpu

    check_forward_and_grads(jax.jit(cpu.variant_attention("native")), dtype, T=100, Dh=Dh)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_flash_attention_built_for_avx2_matches_reference(monkeypatch, dtype):
    """The 8-float-vector code a CPU without AVX-512 compiles (Zen 3), built here with -mno-avx512f."""
    from llmx.attention import cpu

    monkeypatch.setitem(cpu.VARIANTS, "avx2", ["-DLLMX_FLASH_NO_BF16_DOTS", "-mno-avx512f"])
    check_forward_and_grads(jax.jit(cpu.variant_attention("avx2")), dtype, T=100)


@pytest.mark.slow
def test_cpu_flash_attention_agrees_with_xla_in_a_train_step():
    """The same model and batch: loss and every gradient of model.attention=cpu against xla (fp32)."""
    from llmx import config as config_lib
    from llmx import mesh as mesh_lib
    from llmx.benchmark import synthetic_batch
    from llmx.step import objective_sums, build_steps

    results = []
    for attention in ("cpu", "xla"):
        cfg = config_lib.load(REPO / "configs" / "tiny.yaml", [f"model.attention={attention}", "mesh.data=1"])
        mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1])
        built = build_steps(cfg, mesh)
        state, batch = built.init(), jax.tree.map(lambda a: np.array(a[0]), synthetic_batch(cfg, mesh))
        T = batch["inputs"].shape[1]  # two documents per row, the second starting inside a 64-row tile
        batch["segment_ids"][:, 100:] = 2
        batch["positions"] = np.concatenate([np.arange(100), np.arange(T - 100)])[None].repeat(len(batch["inputs"]), 0)

        def loss(params):
            with mesh_lib.activation_sharding(mesh):
                return objective_sums(params, built.graphdef, batch)[0]

        hlo = jax.jit(jax.value_and_grad(loss)).lower(state.params).as_text()
        assert ("llmx_flash_cpu" in hlo) == (attention == "cpu")
        results.append(jax.jit(jax.value_and_grad(loss))(state.params))
    (loss_cpu, grads_cpu), (loss_xla, grads_xla) = results
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.abs(b).max()))


def test_auto_on_one_cpu_device_follows_the_probe(monkeypatch, tmp_path):
    """auto: the cpu kernel where the cached probe timed it faster, xla where not, on several devices, and
    for fp16; the probe runs once per CPU, source and dtype (cached in LLMX_CACHE_DIR)."""
    from llmx.attention import cpu, resolve
    from llmx.errors import ConfigError

    monkeypatch.setenv("LLMX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_PROBES", {})
    monkeypatch.setattr(cpu, "available", lambda: True)
    timings = {"native": 1.0, "wide": 1.5, "xla": 2.0}
    calls = []
    monkeypatch.setattr(cpu, "measure", lambda dtype: calls.append(dtype) or dict(timings))
    assert resolve("auto", jnp.bfloat16, "cpu", 1) == "cpu"
    assert resolve("auto", jnp.bfloat16, "cpu", 8) == "xla"
    assert resolve("auto", jnp.float16, "cpu", 1) == "xla"
    cpu._PROBES.clear()  # a new process: the file answers
    assert resolve("auto", jnp.bfloat16, "cpu", 1) == "cpu" and calls == [jnp.bfloat16]
    assert cpu.best_variant(jnp.bfloat16) == "native"
    timings.update(native=3.0, wide=2.5)
    assert resolve("auto", jnp.float32, "cpu", 1) == "xla" and calls == [jnp.bfloat16, jnp.float32]
    assert cpu.best_variant(jnp.float32) == "wide"  # the faster build, though both lose to xla here
    assert (tmp_path / "flash_cpu" / "probe.json").exists()
    with pytest.raises(ConfigError, match="cudnn"):
        resolve("cudnn", jnp.float32)


def test_cpu_attention_refusals_are_one_config_error(monkeypatch):
    from llmx.attention import cpu, kernel, resolve
    from llmx.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attention=cpu takes fp32 or bf16 compute, not float16"):
        resolve("cpu", jnp.float16, "cpu", 1)
    with pytest.raises(ConfigError, match="model.attention=cpu runs on one CPU device and this mesh has 8"):
        resolve("cpu", jnp.bfloat16, "cpu", 8)
    q, k, v, seg = inputs(jnp.float32, Dh=8)
    with pytest.raises(ConfigError, match="head_dim that is a multiple of 16, not 8"):
        kernel("cpu", jnp.float32)(q, k, v, seg, None)
    faster_than_xla = cpu.faster_than_xla
    monkeypatch.setattr(cpu, "faster_than_xla", lambda dtype: True)  # auto falls back to xla for that head size
    np.testing.assert_allclose(kernel("auto", jnp.float32)(q, k, v, seg, None), reference_attention(q, k, v, seg),
                               atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(cpu, "_load", lambda: (False, "no C++ compiler found (set CXX or install g++)"))
    with pytest.raises(ConfigError, match=r"model.attention=cpu: no C\+\+ compiler found .*; use model.attention=xla"):
        resolve("cpu", jnp.bfloat16, "cpu", 1)
    assert not faster_than_xla(jnp.bfloat16)


@pytest.mark.slow
def test_cpu_kernel_without_a_compiler_and_with_a_damaged_cached_library(monkeypatch, tmp_path):
    """No compiler: unavailable, with the reason. A damaged library in the cache (dlopen of a truncated
    shared object dies with SIGBUS) is found by its recorded digest and rebuilt, in a fresh process."""
    import sys

    from llmx import native
    from llmx.attention import cpu

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert cpu._load.__wrapped__() == (False, "no C++ compiler found (set CXX or install g++)")
    monkeypatch.undo()
    path = Path(tmp_path) / "flash_cpu" / cpu._library_path(cpu._compiler()).name
    cpu._build(cpu._compiler(), path)
    assert cpu._intact(path)
    path.write_bytes(path.read_bytes()[:1000])
    assert not cpu._intact(path)
    code = "from llmx.attention import cpu; print(cpu.available())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, LLMX_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-3000:]
    assert "is damaged; rebuilding it" in proc.stderr and cpu._intact(path)
    # A compiler that fails: the reason names it, its exit status and the last line it printed.
    monkeypatch.setenv("CXX", "false")
    compiler = cpu._compiler()
    with pytest.raises(RuntimeError, match=r"^false exited with 1 compiling flash_cpu.cc$"):
        cpu._build(compiler, Path(tmp_path) / "other" / "lib.so")
    assert not (Path(tmp_path) / "other" / "lib.so").exists()


def test_every_attention_choice_has_a_kernel():
    """model.attention's choices are the ATTENTION table plus auto, and auto resolves into the table."""
    from llmx.attention import ATTENTION, AUTO
    from llmx.config import ModelConfig

    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == "attention")
    assert set(field.metadata["choices"]) == {"auto", *ATTENTION}
    assert set(AUTO.values()) <= set(ATTENTION)


# ---------------------------------------------------------------- AOT for real targets


def run_worker(*args: str) -> dict:
    from test_pallas_aot import H100_TARGET_CONFIG

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), LLMX_H100_TARGET_CONFIG=H100_TARGET_CONFIG)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([AOT_PYTHON, str(REPO / "tests" / "aot_attention_worker.py"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"AOT worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1])


@pytest.mark.aot_tpu
def test_aot_tpu_splash_train_step_and_optimizer_offload():
    needs_extra("libtpu", "tpu")
    report = run_worker("tpu")
    assert report["splash_kernel_calls"] > 0, "no Mosaic splash kernel in the compiled TPU train step"
    assert report["opt_state_memory_kinds"] == ["pinned_host"]
    assert report["host_offload_in_hlo"], "the compiled step does not move the optimizer state from host memory"
    assert report["host_bytes"] > 0
    assert report["remat_offload_host_buffers"] > 0, "model.remat=offload moved no activation to host memory"


@pytest.mark.aot_gpu
def test_aot_h100_cudnn_and_triton_attention():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    # jax checks the cuDNN version while tracing, even for AOT: the gpu extra has nvidia-cudnn-cu12.
    needs_extra("nvidia.cudnn", "gpu")
    report = run_worker("cuda")
    # Without a GPU, XLA leaves the custom calls in place but builds no cuDNN graph (its workspace pass
    # needs a device), so this proves the lowering and the H100 compile, not cuDNN's support for the graph.
    assert report["cudnn_calls"] > 0, "no cuDNN fused attention in the compiled H100 step"
    assert report["cudnn_backward_calls"] > 0, "no cuDNN fused attention backward in the compiled H100 step"
    # Triton flash attention: forward, the backward's preprocessing and the fused dQ/dK/dV kernel.
    assert report["triton_calls"] >= 3 and not report["triton_mentions_cudnn"], report


@pytest.mark.parametrize("name, kind", [("splash", "TPU"), ("cudnn", "GPU"), ("triton", "GPU")])
def test_a_fused_kernel_on_the_wrong_platform_is_one_config_error(name, kind):
    """Not a lowering traceback ("Only interpret mode is supported on CPU backend") from deep in the step."""
    from llmx.attention import kernel
    from llmx.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"model.attention={name} runs on {kind} only and this step is compiled "
                                          r"for cpu; use model.attention=auto or xla"):
        kernel(name, jnp.bfloat16)
