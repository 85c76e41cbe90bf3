"""Fit or refuse: before the train state is allocated, compare what a step needs per device with what
the devices have, and stop with the figures and the cheapest fixes when it cannot fit.

Without this a run too large for its machine is found out by the kernel's OOM killer or an allocator
failure deep inside XLA, minutes in. Everything here is abstract (`llmx.plan`): the state's bytes come
from its shardings, the step's from XLA's `memory_analysis` of the real step compiled ahead of time, so
nothing large is allocated, and the compiled step is the one the first training step then reuses (jit
keeps it). When the state alone cannot fit, the step is not even compiled: a 40B-parameter config on a
laptop is refused within seconds.

What a device has: on an accelerator, its allocator's limit less what is in use (`memory_stats()`); on
the CPU, the RAM the kernel (and a cgroup limit) says is available, shared by all local CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax

from llmx import distributed, plan
from llmx.config import Config
from llmx.errors import ResourceError
from llmx.step import Steps

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Available:
    bytes: int  # what the devices below can still allocate together
    devices: int  # local devices sharing `bytes` (the CPU's simulated devices share the host's RAM); 1 on accelerators
    where: str  # for messages: "RAM of the host", "HBM of cuda:0"


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, capped by the cgroup's memory limit (v2 or v1) less its usage."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            available = min(available, limit - usage) if available is not None else limit - usage
    return available


def available_memory(devices) -> Available | None:
    """What the local devices of the mesh can still allocate; None where it cannot be told."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    if local[0].platform == "cpu":
        host = host_available_bytes()
        return None if host is None else Available(host, len(local), "RAM of the host")
    free = []
    for device in local:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append((stats["bytes_limit"] - stats.get("bytes_in_use", 0), device))
    nbytes, device = min(free, key=lambda pair: pair[0])
    return Available(nbytes, 1, f"memory of {device.platform}:{device.id} ({device.device_kind})")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.2f} MiB"


def _micro_batch_fix(cfg: Config, *, temporaries: int, budget: float) -> str | None:
    """Smaller micro-batches, more of them (the same global batch): the step's temporaries are mostly
    activations, about proportional to the micro-batch; the smallest power-of-two split that fits."""
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    split = 2
    while split < micro and temporaries / split > budget:
        split *= 2
    split = min(split, micro)
    if split < 2:
        return None
    return f"train.micro_batch_size={micro // split} train.grad_accum_steps={accum * split} (same global batch)"


def _fixes(cfg: Config, steps: Steps, state: plan.StateMemory, *, need: int, available: Available,
           temporaries: int | None) -> list[str]:
    """The changes that lower the need, cheapest first: sharding the state (ZeRO-3), smaller
    micro-batches and rematerialisation (for the step's temporaries), host offload of the optimizer
    state, more memory or devices."""
    fixes = []
    mesh, n = steps.mesh, steps.mesh.size
    zero3 = state.whole / n  # ZeRO-3 over every device (ZeRO §5.1)
    if cfg.mesh.zero_stage < 3 and n > 1 and zero3 < 0.9 * state.total:
        fixes.append(f"mesh.data=1 mesh.fsdp=-1 mesh.zero_stage=3 (state {_gib(zero3)} per device)")
    if temporaries:
        budget = available.bytes / available.devices - (need - temporaries)
        micro = _micro_batch_fix(cfg, temporaries=temporaries, budget=budget)
        fixes += [micro] if micro else []
        fixes += ["model.remat=full"] if cfg.model.remat == "none" else []
    platform = mesh.devices.flat[0].platform
    if platform == "cpu":
        return fixes + [f"a machine with at least {_gib(need * available.devices)} of RAM available", "a smaller model"]
    if not cfg.mesh.offload_optimizer:
        fixes.append("mesh.offload_optimizer=true")
    devices = math.ceil(state.whole / available.bytes)
    if devices > n:
        fixes.append(f"at least {devices} such devices (mesh.zero_stage=3) for the state alone")
    return fixes + ["a smaller model"]


def _refuse(cfg: Config, steps: Steps, state: plan.StateMemory, *, need: int, what: str, available: Available,
            temporaries: int | None) -> ResourceError:
    n = available.devices
    shared = f" x {n} devices = {_gib(need * n)}" if n > 1 else ""
    fixes = _fixes(cfg, steps, state, need=need, available=available, temporaries=temporaries)
    return ResourceError(
        f"this run does not fit: it needs {_gib(need)} per device{shared} ({what}) but the {available.where} has "
        f"{_gib(available.bytes)} available; cheapest fixes: {'; '.join(fixes)}; "
        "or train.skip_fit_check=true to try anyway"
    )


def check(cfg: Config, steps: Steps) -> str:
    """Raises a ResourceError when one training step cannot fit in the devices' memory, else returns
    the verdict in a line; compiles the step (kept by jit for the first real step) only when the state
    alone fits. Every process raises when one does (each measures its own host or devices)."""
    try:
        verdict, error = _verdict(cfg, steps), None
    except ResourceError as e:
        verdict, error = "", str(e)
    errors = [e for e in distributed.gather_json(error) if e is not None]
    if errors:
        raise ResourceError(errors[0])
    return verdict


def _verdict(cfg: Config, steps: Steps) -> str:
    available = available_memory(list(steps.mesh.devices.flat))
    if available is None:
        return "fit check skipped: the devices do not report their memory"
    state = plan.state_memory(cfg, steps)
    # mesh.offload_optimizer keeps the optimizer state in host memory on accelerators (a no-op on CPU).
    on_host = state.opt_state if cfg.mesh.offload_optimizer and steps.mesh.devices.flat[0].platform != "cpu" else 0
    if (state.total - on_host) * available.devices > available.bytes:
        what = (f"params {_gib(state.params)}, gradients {_gib(state.grads)}, optimizer state {_gib(state.opt_state)}; "
                "before the step's temporaries")
        raise _refuse(cfg, steps, state, need=state.total - on_host, what=what, available=available, temporaries=None)
    try:
        compiled = plan.compile_train_step(cfg, steps)
    except jax.errors.JaxRuntimeError as e:
        refused = plan.compiler_out_of_memory(str(e))
        if refused is None:
            raise
        # The TPU compiler refuses a program that cannot fit: its own figures are the verdict.
        what = f"the compiler's figure for the step; state {_gib(state.total)}"
        raise _refuse(cfg, steps, state, need=int(refused[0]), what=what, available=available,
                      temporaries=int(refused[0])) from None
    analysis = compiled.memory_analysis()
    need = plan.peak_bytes(analysis)
    if need * available.devices > available.bytes:
        what = (f"state and batch {_gib(analysis.argument_size_in_bytes)}, "
                f"temporaries {_gib(analysis.temp_size_in_bytes)}, from XLA's analysis of the compiled step")
        raise _refuse(cfg, steps, state, need=need, what=what, available=available,
                      temporaries=analysis.temp_size_in_bytes)
    return (f"fit check: a step needs {_gib(need)} per device x {available.devices} device"
            f"{'s' * (available.devices > 1)}; the {available.where} has {_gib(available.bytes)} available")
