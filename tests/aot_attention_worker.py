"""AOT worker of tests/test_attention.py and tests/test_sequence.py (runs under LLMX_AOT_PYTHON, which
need not have pytest): `python tests/aot_attention_worker.py tpu|cuda|tpu_ulysses|cuda_ulysses` prints
one JSON report."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np


AOT_MODEL = ["model.vocab_size=512", "model.d_model=512", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.d_ff=1024", "model.seq_len=512", "train.micro_batch_size=2", "train.precision=bf16"]


def _tpu_worker() -> dict:
    from jax.experimental import topologies

    from llmx import config as config_lib
    from llmx.mesh import make_mesh
    from llmx.plan import compile_train_step
    from llmx.step import build_steps

    devices = list(topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices)
    cfg = config_lib.load(None, [*AOT_MODEL, "model.attention=splash", "mesh.data=1", "mesh.fsdp=-1",
                                 "mesh.zero_stage=1", "mesh.offload_optimizer=true"])
    steps = build_steps(cfg, make_mesh(cfg.mesh, devices))
    compiled = compile_train_step(cfg, steps)
    hlo = compiled.as_text()
    kinds = sorted({s.memory_kind for s in jax.tree.leaves(steps.state_shardings.opt_state)})
    analysis = compiled.memory_analysis()
    # model.remat=offload: the projections' outputs leave for host memory in the forward pass.
    offload_cfg = config_lib.load(None, [*AOT_MODEL, "model.remat=offload", "mesh.data=1", "mesh.fsdp=-1"])
    offload_hlo = compile_train_step(offload_cfg, build_steps(offload_cfg, make_mesh(offload_cfg.mesh, devices))).as_text()
    return {
        "remat_offload_host_buffers": offload_hlo.count("S(5)"),
        "splash_kernel_calls": hlo.count("tpu_custom_call"),
        "opt_state_memory_kinds": kinds,
        # S(5) is the host memory space in TPU HLO layouts; the step copies the state in and out.
        "host_offload_in_hlo": "S(5)" in hlo,
        "host_bytes": getattr(analysis, "host_argument_size_in_bytes", 0) + getattr(analysis, "host_output_size_in_bytes", 0),
    }


def _cuda_worker() -> dict:
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmx.attention import cudnn_attention, triton_attention
    devices = topologies.get_topology_desc("h100", platform="cuda", target_config=os.environ["LLMX_H100_TARGET_CONFIG"],
                                           topology="1x1x1").devices
    mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
    B, T, H, K, Dh = 2, 512, 8, 2, 128
    sh = NamedSharding(mesh, P())
    q = jax.ShapeDtypeStruct((B, T, H, Dh), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((B, T, K, Dh), jnp.bfloat16, sharding=sh)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh)

    def loss(q, k, v, s):
        return jnp.sum(cudnn_attention(q, k, v, s).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile().as_text()
    targets = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo)

    def triton_loss(q, k, v, s):
        return jnp.sum(triton_attention(q, k, v, s).astype(jnp.float32))

    triton_hlo = jax.jit(jax.grad(triton_loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile().as_text()
    return {"cudnn_calls": len(targets), "cudnn_backward_calls": sum(t.endswith("Backward") for t in targets),
            "triton_calls": triton_hlo.count("__gpu$xla.gpu.triton"), "triton_mentions_cudnn": "cudnn" in triton_hlo}


def _ulysses_worker(devices, local: str, **mesh_sizes) -> dict:
    """The gradient of Ulysses attention around a fused kernel, compiled for the target's devices."""
    from jax.sharding import AxisType, Mesh, NamedSharding

    from llmx import attention, axes
    from llmx import mesh as mesh_lib

    shape = [mesh_sizes.get(name, 1) for name in axes.NAMES]
    mesh = Mesh(np.asarray(devices).reshape(shape), axes.NAMES, axis_types=(AxisType.Auto,) * len(shape))
    B, T, H, K, Dh = 2, 1024, 8, 4, 128
    spec = lambda *names: NamedSharding(mesh, mesh_lib.logical_to_spec(names, (B, T, H, Dh)[:len(names)],  # noqa: E731
                                                                          mesh_lib.RULES, mesh))
    q = jax.ShapeDtypeStruct((B, T, H, Dh), jnp.bfloat16, sharding=spec("batch", "seq", "heads", "head_dim"))
    kv = jax.ShapeDtypeStruct((B, T, K, Dh), jnp.bfloat16, sharding=spec("batch", "seq", "kv_heads", "head_dim"))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=spec("batch", "seq"))
    parallel = attention.SequenceParallel("ulysses", "sequence", mesh.shape["sequence"], balanced=False)

    def loss(q, k, v, seg, pos):
        with mesh_lib.activation_sharding(mesh), attention.sequence_parallel(parallel):
            return jnp.sum(attention.kernel(local, q.dtype)(q, k, v, seg, pos).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, tokens, tokens).compile().as_text()
    return {
        "all_to_all": len(re.findall(r" all-to-all(?:-start)?\(", hlo)),
        "splash_kernel_calls": hlo.count("tpu_custom_call"),
        "cudnn_calls": len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo)),
    }


def _tpu_ulysses_worker() -> dict:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return _ulysses_worker(devices, "splash", sequence=4)


def _cuda_ulysses_worker() -> dict:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc("h100", platform="cuda", target_config=os.environ["LLMX_H100_TARGET_CONFIG"],
                                           topology="1x1x8").devices
    return _ulysses_worker(devices, "cudnn", fsdp=2, sequence=4)


if __name__ == "__main__":
    workers = {"tpu": _tpu_worker, "cuda": _cuda_worker, "tpu_ulysses": _tpu_ulysses_worker,
               "cuda_ulysses": _cuda_ulysses_worker}
    print(json.dumps(workers[sys.argv[1]]()))
