"""Splitting this machine's devices between trials that run at once, through the environment each
trial process starts with (the sweep process itself never initialises a device backend: on a GPU that
would take memory the trials need).

- CPU: `XLA_FLAGS=--xla_force_host_platform_device_count=N` gives each trial N simulated devices (the
  sweep's own count, from its XLA_FLAGS, split evenly; 1 when unset).
- GPU: `CUDA_VISIBLE_DEVICES` with a disjoint list of GPU ids per trial.
- TPU: libtpu's per-process bounds (`TPU_VISIBLE_CHIPS`, `TPU_CHIPS_PER_PROCESS_BOUNDS`,
  `TPU_PROCESS_BOUNDS`, a port per process), the variables Ray and the JAX issue tracker (#14977)
  use to run independent processes on chips of one TPU VM; libtpu accepts 1, 2 or 4 chips per process.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess

from llmx.errors import ConfigError

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
# Chips per process -> the bounds libtpu expects for that many chips of one host.
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
TPU_BASE_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Devices:
    platform: str  # cpu, gpu or tpu
    ids: tuple[int, ...]  # device ids of this machine (CPU: 0..N-1 of the simulated devices)


def detect(platform: str = "auto", environ: dict | None = None) -> Devices:
    """This machine's devices, without importing jax."""
    env = os.environ if environ is None else environ
    if platform == "auto":
        wanted = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
        if wanted in ("cpu", "tpu"):
            platform = wanted
        elif wanted in ("cuda", "gpu") or _gpu_ids(env):
            platform = "gpu"
        elif _tpu_chips():
            platform = "tpu"
        else:
            platform = "cpu"
    if platform == "cpu":
        match = _COUNT_FLAG.search(env.get("XLA_FLAGS", ""))
        return Devices("cpu", tuple(range(int(match.group(1)) if match else 1)))
    if platform == "gpu":
        ids = _gpu_ids(env)
        if not ids:
            raise ConfigError("sweep.platform=gpu but no GPU is visible (nvidia-smi lists none)")
        return Devices("gpu", ids)
    chips = _tpu_chips()
    if not chips:
        raise ConfigError("sweep.platform=tpu but this machine has no TPU chips (/dev/accel* or /dev/vfio)")
    return Devices("tpu", chips)


def _gpu_ids(env) -> tuple[int, ...]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(int(i) for i in visible.split(",") if i.strip().isdigit())
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(line) for line in out.split() if line.strip().isdigit())


def _tpu_chips() -> tuple[int, ...]:
    accel = sorted(int(p.removeprefix("/dev/accel")) for p in glob.glob("/dev/accel[0-9]*"))
    vfio = sorted(int(os.path.basename(p)) for p in glob.glob("/dev/vfio/[0-9]*"))
    return tuple(range(len(accel or vfio)))


def subset_size(devices: Devices, *, parallel: int, per_trial: int = 0) -> int:
    """Devices per trial: `per_trial`, or the machine's devices split evenly over `parallel` trials."""
    n = len(devices.ids)
    size = per_trial or n // parallel
    if size < 1 or size * parallel > n:
        raise ConfigError(
            f"sweep.parallel={parallel} trials cannot each get "
            f"{per_trial or 'at least 1'} of this machine's {n} {devices.platform.upper()} device(s); "
            f"use sweep.parallel <= {max(1, n // max(1, per_trial or 1))}"
            + (" (or set XLA_FLAGS=--xla_force_host_platform_device_count=N for N simulated CPU devices)"
               if devices.platform == "cpu" else "")
        )
    if devices.platform == "tpu" and size not in _TPU_BOUNDS and size != n:
        raise ConfigError(
            f"{size} TPU chips per trial: libtpu runs a process on 1, 2 or 4 chips (or all {n}); "
            "change sweep.parallel or sweep.devices_per_trial"
        )
    return size


def slot_environments(devices: Devices, *, parallel: int, per_trial: int = 0, environ: dict | None = None) -> list[dict]:
    """One environment overlay per slot: `parallel` disjoint device subsets."""
    env = os.environ if environ is None else environ
    size = subset_size(devices, parallel=parallel, per_trial=per_trial)
    slots = []
    for slot in range(parallel):
        ids = devices.ids[slot * size:(slot + 1) * size]
        if devices.platform == "cpu":
            flags = _COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
            slots.append({"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={size}".strip(),
                          "JAX_PLATFORMS": env.get("JAX_PLATFORMS") or "cpu"})
        elif devices.platform == "gpu":
            slots.append({"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))})
        elif size == len(devices.ids):
            slots.append({})  # the whole host: libtpu's defaults
        else:
            port = TPU_BASE_PORT + slot
            slots.append({
                "TPU_VISIBLE_CHIPS": ",".join(map(str, ids)),
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[size],
                "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_PORT": str(port),
                "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
                "CLOUD_TPU_TASK_ID": "0",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            })
    return slots
