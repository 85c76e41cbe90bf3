"""AOT proof for real hardware: the fused optimizers compile for TPU (Mosaic) and H100 (Triton).

Nothing here needs an accelerator: `jax.experimental.topologies` describes target
devices, and `jax.jit(f).lower(ShapeDtypeStructs with NamedSharding).compile()`
runs the real backend compiler for them. Loading libtpu / the CUDA plugin would
slow and clutter the CPU suite, so each compile runs in a subprocess
(`python tests/test_pallas_aot.py <target>`) that prints one JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import AOT_PYTHON, needs_extra

REPO = Path(__file__).resolve().parents[1]
# topology -> compile-only devices (the v4 description lists both TensorCores of each chip).
TPU_TOPOLOGIES = {"v5e:2x2": 4, "v4:2x2x1": 8}
# XLA's GpuTargetConfig for an H100 SXM (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# A few Llama-ish leaves plus odd ones (padded remainder blocks).
AOT_SHAPES = {"embed": (1024, 512), "mlp": (512, 1536), "norm": (512,), "bias": (1536,), "odd": (257, 3), "scalar": ()}
KERNEL_MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def run_worker(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)  # the fake CPU devices of the test session are not wanted here
    proc = subprocess.run(
        [AOT_PYTHON, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"AOT worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1])


def check_report(report: dict, platform: str, num_devices: int):
    assert report["num_devices"] == num_devices
    assert len(report["compiled"]) == 12  # 3 optimizers x {fp32, bf16 + master} x {one device, sharded}
    for case in report["compiled"]:
        assert case["kernel_calls"] > 0, f"{case['name']}: no {KERNEL_MARKERS[platform]} in the compiled HLO"
        if case["sharded"] and case["name"].startswith("lamb"):
            assert case["all_reduces"] > 0, f"{case['name']}: LAMB's partial norms were not psum-ed"
    # llmx.optim with optim.impl=pallas picks the compiled kernel by the target mesh's platform, though
    # the compiling host's default backend is CPU.
    trainer = report["llmx_optim"]
    assert trainer["impl"] == "pallas" and trainer["kernel_calls"] > 0, trainer


@pytest.mark.aot_tpu
@pytest.mark.parametrize("topology", TPU_TOPOLOGIES)
def test_aot_tpu(topology):
    needs_extra("libtpu", "tpu")
    check_report(run_worker("tpu", topology), "tpu", num_devices=TPU_TOPOLOGIES[topology])


@pytest.mark.aot_tpu
def test_aot_tpu_oversized_block_fails_on_vmem():
    """Negative control: the TPU compile is real, so a block that cannot fit VMEM is rejected."""
    needs_extra("libtpu", "tpu")
    report = run_worker("tpu-oversized", "v5e:2x2")
    assert report["compiled"] is False
    assert "vmem" in report["error"].lower(), report["error"][:2000]


@pytest.mark.aot_gpu
def test_aot_h100():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    check_report(run_worker("cuda", "h100"), "cuda", num_devices=8)


# ---------------------------------------------------------------- worker (runs in the subprocess)


def _target_devices(platform: str, topology: str) -> list:
    from jax.experimental import topologies

    if platform == "tpu":
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    return list(
        topologies.get_topology_desc(
            "h100", platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x8"
        ).devices
    )


def _compile_update(tx, params, param_specs, mesh, *, shard_params: bool):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from pallas_kernels import sharded

    def abstract(tree, specs):
        return jax.tree.map(
            lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)), tree, specs
        )

    def specs_of(state):
        if not hasattr(state, "_fields"):  # optax.chain's tuple of states
            return tuple(specs_of(s) for s in state)
        return type(state)(
            *(PartitionSpec() if hasattr(f, "shape") else sharded.per_leaf_specs(f, param_specs) for f in state)
        )

    state = jax.eval_shape(tx.init, params)
    state_specs = specs_of(state)
    specs = param_specs if shard_params else jax.tree.map(lambda _: PartitionSpec(), param_specs)
    args = (abstract(params, specs), abstract(state, state_specs), abstract(params, specs))
    return jax.jit(tx.update).lower(*args).compile()


def _worker(mode: str, topology: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, PartitionSpec

    import pallas_kernels

    platform = "tpu" if mode.startswith("tpu") else "cuda"
    devices = _target_devices(platform, topology)
    blocks = pallas_kernels.BlockSizes.get_default(interpret=False, platform=platform)
    one = Mesh(np.array(devices[:1]), ("fsdp",), axis_types=(AxisType.Auto,))
    mesh = Mesh(np.array(devices), ("fsdp",), axis_types=(AxisType.Auto,))

    if mode == "tpu-oversized":
        # 16384 rows x 128 lanes x 4 B = 8 MiB per buffer; 7 buffers, double-buffered, plus the
        # kernel's temporaries exceed the 128 MiB of v5e VMEM. (Mosaic unrolls a block into vreg ops,
        # so larger blocks make this compile slower, not more certain.)
        params = {"w": jax.ShapeDtypeStruct((2 * 16384 * 128,), jnp.float32)}
        tx = pallas_kernels.adamw(1e-3, block_sizes=pallas_kernels.BlockSizes(block_rows=16384), interpret=False)
        try:
            _compile_update(tx, params, {"w": PartitionSpec()}, one, shard_params=True)
        except Exception as error:  # noqa: BLE001 - the error text is the result
            return {"compiled": False, "error": f"{type(error).__name__}: {error}"}
        return {"compiled": True, "error": ""}

    def zero_spec(shape):
        for dim, size in enumerate(shape):
            if size % len(devices) == 0:
                return PartitionSpec(*([None] * dim), "fsdp")
        return PartitionSpec()

    factories = {
        "adamw": lambda **kw: pallas_kernels.adamw(1e-3, weight_decay=0.1, **kw),
        "sgd_nesterov": lambda **kw: pallas_kernels.sgd(1e-3, 0.9, True, **kw),
        "lamb": lambda **kw: pallas_kernels.lamb(1e-3, weight_decay=0.01, **kw),
    }
    compiled = []
    for name, factory in factories.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            params = {key: jax.ShapeDtypeStruct(shape, dtype) for key, shape in AOT_SHAPES.items()}
            param_specs = {key: zero_spec(shape) for key, shape in AOT_SHAPES.items()}
            replicated = {key: PartitionSpec() for key in AOT_SHAPES}
            for sharded_case in (False, True):
                tx = factory(
                    block_sizes=blocks,
                    interpret=False,
                    mesh=mesh if sharded_case else one,
                    param_specs=param_specs if sharded_case else replicated,
                )
                executable = _compile_update(
                    tx,
                    params,
                    param_specs if sharded_case else replicated,
                    mesh if sharded_case else one,
                    shard_params=True,
                )
                hlo = executable.as_text()
                compiled.append(
                    {
                        "name": f"{name}-{jnp.dtype(dtype).name}",
                        "sharded": sharded_case,
                        "kernel_calls": hlo.count(KERNEL_MARKERS[platform]),
                        "all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
                    }
                )
    from llmx import config as config_lib
    from llmx import optim

    cfg = config_lib.load(None, ["optim.impl=pallas", "optim.name=lamb"]).optim
    params = {key: jax.ShapeDtypeStruct(shape, jnp.bfloat16) for key, shape in AOT_SHAPES.items()}
    param_specs = {key: zero_spec(shape) for key, shape in AOT_SHAPES.items()}
    tx, _ = optim.build(cfg, 100, mesh=mesh, state_specs=param_specs)
    hlo = _compile_update(tx, params, param_specs, mesh, shard_params=True).as_text()
    trainer = {"impl": optim.fused_impl(mesh), "kernel_calls": hlo.count(KERNEL_MARKERS[platform])}
    return {
        "platform": platform,
        "topology": topology,
        "num_devices": len(devices),
        "compiled": compiled,
        "llmx_optim": trainer,
    }


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], sys.argv[2])))
