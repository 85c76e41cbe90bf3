"""Hardware a plan can be compiled for without having it: TPU topologies through libtpu and CUDA GPUs
through the CUDA plugin and an XLA GPU target description (`jax.experimental.topologies`).

Figures per device: HBM bytes, dense bf16 peak FLOP/s and HBM bandwidth, from the vendors' data sheets.
They feed the plan's fits / does-not-fit verdict and its roofline estimate.
"""

from __future__ import annotations

import dataclasses
import os
import re

from llmx.errors import ConfigError, LlmxError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_second: float


TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.76e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
}
GPU_CHIPS = {
    "a100": Chip("NVIDIA A100 80GB", 80 * GiB, 312e12, 2.04e12),
    "h100": Chip("NVIDIA H100 80GB HBM3", 80 * GiB, 989e12, 3.35e12),
    "h200": Chip("NVIDIA H200", 141 * GiB, 989e12, 4.8e12),
}

# XLA's GpuTargetConfig (xla/tools/hlo_opt/gpu_specs/*.txtpb); {memory}, {bandwidth}, {name} per chip.
_GPU_TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_core} threads_per_core_limit: 2048 core_count: {cores}
  fpus_per_core: {fpus} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {clock} device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""
_GPU_ARCH = {
    "a100": dict(smem_per_core=167936, cores=108, fpus=64, l2=41943040, clock=1.41, smem_optin=166912, cc_major=8, cc_minor=0),
    "h100": dict(smem_per_core=233472, cores=132, fpus=128, l2=52428800, clock=1.98, smem_optin=232448, cc_major=9, cc_minor=0),
    "h200": dict(smem_per_core=233472, cores=132, fpus=128, l2=52428800, clock=1.98, smem_optin=232448, cc_major=9, cc_minor=0),
}


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # what the user wrote: "current", "v5e:2x2", "h100:1x1x8"
    chip: Chip | None  # None for "current"
    devices: list


def gpu_target_config(kind: str) -> str:
    chip = GPU_CHIPS[kind]
    return _GPU_TARGET.format(**_GPU_ARCH[kind], bandwidth=int(chip.hbm_bytes_per_second),
                              memory=int(chip.hbm_bytes), name=chip.name)


def resolve(spec: str) -> Target:
    """The devices of a target: `current`, a TPU topology `v5e:2x2`, or a GPU target `h100:1x1x8`."""
    if spec == "current":
        import jax

        return Target(spec, None, jax.devices())
    match = re.fullmatch(r"(\w+):([\dx]+)", spec)
    kind = match.group(1).lower() if match else ""
    if kind not in TPU_CHIPS and kind not in GPU_CHIPS:
        known = ", ".join([f"{k}:2x2" for k in TPU_CHIPS] + [f"{k}:1x1x8" for k in GPU_CHIPS])
        raise ConfigError(f"--target {spec!r} is not 'current', a TPU topology or a GPU target (e.g. {known})")
    import jax
    from jax.experimental import topologies

    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        # Compiling for a target needs no local accelerator: without this, a CPU host with the gpu extra
        # tries to start the CUDA runtime, fails, and the cuda platform is then missing ("topology not
        # implemented for cuda"). A no-op where the backends already started.
        jax.config.update("jax_platforms", "cpu")
    try:
        if kind in TPU_CHIPS:
            # Compiling needs no TPU, so several processes may hold libtpu at once (its lock file
            # otherwise refuses a second one: "libtpu multi-process lockfile").
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            import libtpu  # noqa: F401  (the TPU compiler)

            topology = topologies.get_topology_desc(platform="tpu", topology_name=spec)
        else:
            import jax_plugins.xla_cuda12  # noqa: F401  (the CUDA compiler)

            topology = topologies.get_topology_desc(kind, platform="cuda", target_config=gpu_target_config(kind),
                                                    topology=match.group(2))
    except ImportError:
        extra = "tpu" if kind in TPU_CHIPS else "gpu"
        raise LlmxError(f"--target {spec} needs the {extra} extra: pip install -e '.[{extra}]'") from None
    except Exception as e:  # the plugins report an unknown topology with assorted exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--target {spec}: {first[:200]}") from None
    return Target(spec, TPU_CHIPS.get(kind) or GPU_CHIPS[kind], list(topology.devices))
