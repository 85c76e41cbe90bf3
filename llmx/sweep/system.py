"""`python -m llmx.sweep --mode system`: DeepSpeed autotuning's job, done ahead of time with `llmx.plan`.

Enumerates `mesh.zero_stage` x `train.micro_batch_size` x `model.remat` x mesh layouts for the devices
of a target, keeping the global batch of the base config (the micro batch trades against gradient
accumulation, so the optimiser sees the same batches); compiles each candidate's real train step
(`llmx.plan`), drops those that do not fit, ranks the rest by estimated step time, and on the local
machine times the best few for real. The fastest becomes `best.yaml`; `system.csv` holds everything
that was tried and why it was dropped.

The estimate is the plan's roofline (the slower of peak FLOP/s and HBM bandwidth) with the FLOPs that
activation checkpointing repeats: `full` recomputes the forward pass, 8 FLOPs per weight and token
instead of 6 (Chen et al. 2016; Korthikanti et al. 2022, §4); the `dots_*` policies save every matmul
output and recompute only elementwise work, counted as free. On the local CPU there is no data-sheet
chip: the estimate is the total model FLOPs over the measured CPU peak, and real timing decides. Ties
go to the compiled step with fewer collectives (the roofline does not model communication).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import math
from pathlib import Path

from llmx import axes
from llmx import mesh as mesh_lib
from llmx import targets
from llmx.benchmark import measure_train_step
from llmx.config import Config
from llmx.errors import ConfigError, LlmxError
from llmx.flops import peak_flops
from llmx.plan import plan
from llmx.sweep import spec as spec_lib
from llmx.train import enable_compilation_cache

log = logging.getLogger("llmx.sweep")
RECOMPUTE = {"none": 1.0, "full": 8 / 6, "dots_saveable": 1.0, "dots_with_no_batch_dims_saveable": 1.0, "offload": 1.0}
COLUMNS = ("data", "fsdp", "tensor", "zero_stage", "micro_batch_size", "grad_accum_steps", "remat", "fits",
           "peak_gib", "collectives", "estimated_ms", "measured_ms", "tokens_per_second", "note")


@dataclasses.dataclass
class Candidate:
    cfg: Config
    row: dict

    @property
    def label(self) -> str:
        r = self.row
        return (f"mesh data={r['data']} fsdp={r['fsdp']} tensor={r['tensor']} zero_stage={r['zero_stage']} "
                f"micro_batch_size={r['micro_batch_size']} grad_accum_steps={r['grad_accum_steps']} remat={r['remat']}")


def layouts(n_devices: int, base: Config) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) with product n_devices; tensor divides the key/value heads (Megatron splits
    attention by heads) and the MLP width."""
    out = []
    for tensor in (t for t in range(1, n_devices + 1) if n_devices % t == 0):
        if base.model.n_kv_heads % tensor or base.model.d_ff % tensor:
            continue
        for fsdp in (f for f in range(1, n_devices // tensor + 1) if (n_devices // tensor) % f == 0):
            out.append((n_devices // tensor // fsdp, fsdp, tensor))
    return out


def candidates(base: Config, space: spec_lib.SystemSpace, n_devices: int) -> list[Candidate]:
    shape = mesh_lib.mesh_shape(base.mesh, n_devices)
    dp_base = axes.data_parallel_size(shape)
    global_batch = base.train.micro_batch_size * base.train.grad_accum_steps * dp_base
    # The base config's sequence parallelism stays: the layouts split the devices left over.
    sequence = shape["sequence"]
    out = []
    for data, fsdp, tensor in [tuple(m) for m in space.mesh] or layouts(n_devices // sequence, base):
        dp = data * fsdp
        micro = space.micro_batch_size or [global_batch // dp, global_batch // (2 * dp)]
        # A ZeRO group (fsdp x sequence) of 1: every stage alike
        stages = sorted(set(space.zero_stage)) if fsdp * sequence > 1 else [min(space.zero_stage)]
        for mbs, stage, remat in itertools.product(sorted(set(micro), reverse=True), stages, space.remat):
            if mbs < 1 or global_batch % (mbs * dp):
                continue
            accum = global_batch // (mbs * dp)
            try:
                # Layouts without pipeline stages (a pipelined base config is planned with python -m llmx.plan).
                cfg = base.replace(mesh={"pipeline": 1, "pipeline_repeats": 1, "data": data, "fsdp": fsdp,
                                         "sequence": sequence, "tensor": tensor, "zero_stage": stage},
                                   train={"micro_batch_size": mbs, "grad_accum_steps": accum, "global_batch_size": 0},
                                   model={"remat": remat})
            except ConfigError as e:
                raise ConfigError(f"sweep.system: {e}") from None
            row = {"data": data, "fsdp": fsdp, "tensor": tensor, "zero_stage": stage, "micro_batch_size": mbs,
                   "grad_accum_steps": accum, "remat": remat, "fits": None, "peak_gib": None, "collectives": None,
                   "estimated_ms": None, "measured_ms": None, "tokens_per_second": None, "note": ""}
            out.append(Candidate(cfg, row))
    if not out:
        raise ConfigError(f"sweep.system: no candidate keeps the global batch of {global_batch} sequences on "
                          f"{n_devices} devices; list sweep.system.micro_batch_size values that divide it")
    return out


def _host_bytes() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return math.inf


def assess(c: Candidate, *, target: str, devices) -> None:
    """Plans one candidate: fits or not, per-device peak and the estimated step time (ms)."""
    try:
        p = plan(c.cfg, target=target)
    except LlmxError as e:
        c.row.update(fits=False, note=f"invalid: {str(e)[:120]}")
        return
    r = c.row
    compiled = p.get("compiled_bytes", {}).get("peak_estimate")
    r["peak_gib"] = round(compiled / 2**30, 3) if compiled else None
    r["collectives"] = sum(p["collectives"].values()) if "collectives" in p else None
    flops = p["model_flops_per_step_per_device"] * RECOMPUTE[r["remat"]]
    if "memory" in p:  # a chip with a data sheet: HBM verdict and the roofline
        r["fits"] = bool(p["memory"]["fits"])
        if not r["fits"]:
            r["note"] = f"short by {p['memory']['shortfall_bytes'] / 2**30:.2f} GiB of HBM"
            return
        chip = targets.resolve(target).chip
        r["estimated_ms"] = 1e3 * max(p["estimated_step_seconds"], flops / chip.peak_bf16_flops)
        return
    # The local machine: CPU devices share the host's memory and cores.
    n = p["devices"]
    r["fits"] = compiled is None or (compiled * n if devices[0].platform == "cpu" else compiled) <= _host_bytes()
    if not r["fits"]:
        r["note"] = "more than the available host memory"
        return
    peak = peak_flops(devices, per_device=c.cfg.train.peak_flops_per_device)
    if peak is None:
        r["note"] = "no peak FLOP/s known for this device (llmx.flops.PEAK_BF16_FLOPS)"
        return
    r["estimated_ms"] = 1e3 * flops * n / peak


def autotune(config: str | None, overrides: list[str], *, target: str = "current") -> dict:
    base, spec, name = spec_lib.load(config, overrides)
    space = spec.system
    devices = targets.resolve(target).devices
    enable_compilation_cache(base.train.compilation_cache_dir, devices)
    tried = candidates(base, space, len(devices))
    sweep_dir = Path(spec.dir or f"sweeps/{name}-system")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("system sweep of %s on %s (%d devices): %d candidates", name, target, len(devices), len(tried))
    for i, c in enumerate(tried):
        assess(c, target=target, devices=devices)
        log.info("[%d/%d] %s: %s", i + 1, len(tried), c.label,
                 f"~{c.row['estimated_ms']:.1f} ms" if c.row["estimated_ms"] is not None else c.row["note"])
    # Ties (the roofline ignores communication; on CPU every layout has the same FLOPs) go to the step
    # with fewer collectives, then to the one with less memory.
    ranked = sorted((c for c in tried if c.row["estimated_ms"] is not None),
                    key=lambda c: (c.row["estimated_ms"], c.row["collectives"] or 0, c.row["peak_gib"] or 0))
    if target == "current":
        for c in ranked[:space.measure]:
            m = measure_train_step(c.cfg, steps=space.measure_steps, warmup=1)
            c.row["measured_ms"] = round(1e3 * m["step_time"], 2)
            c.row["tokens_per_second"] = round(m["tokens_per_second"], 1)
            log.info("measured %s: %.1f ms per step", c.label, c.row["measured_ms"])
        measured = [c for c in ranked if c.row["measured_ms"] is not None]
        ranked = sorted(measured, key=lambda c: c.row["measured_ms"]) + ranked[len(measured):]
    for c in tried:
        if c.row["estimated_ms"] is not None:
            c.row["estimated_ms"] = round(c.row["estimated_ms"], 2)
    order = {id(c): i for i, c in enumerate(ranked)}
    tried.sort(key=lambda c: order.get(id(c), len(order)))
    with open(sweep_dir / "system.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(c.row for c in tried)
    best = ranked[0] if ranked else None
    best_path = None
    if best is not None:
        best_path = sweep_dir / "best.yaml"
        how = (f"measured {best.row['measured_ms']} ms per step" if best.row["measured_ms"] is not None
               else f"estimated {best.row['estimated_ms']} ms per step")
        best_path.write_text(f"# The fastest of {len(tried)} layouts tried by --mode system for {name} on {target}: "
                             f"{how}\n# {best.label}\n" + best.cfg.to_yaml())
    return {"table": format_table(tried), "rows": [c.row for c in tried], "best": best_path,
            "best_label": best.label if best else "", "dir": sweep_dir}


def format_table(tried: list[Candidate]) -> str:
    def cell(v) -> str:
        return "-" if v is None or v == "" else (f"{v:.4g}" if isinstance(v, float) else str(v))

    shown = COLUMNS[:-1]
    cells = [[cell(c.row[k]) for k in shown] for c in tried]
    widths = [max(len(k), *(len(r[i]) for r in cells)) for i, k in enumerate(shown)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(shown, widths))]
    for c, r in zip(tried, cells):
        lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)) + (f"  {c.row['note']}" if c.row["note"] else ""))
    return "\n".join(lines)

