"""`python -m llmx.plan --config X [key=value ...] [--json] [--max-seq-len]`: what a run will cost before it runs.

Builds the abstract train state (no parameters are allocated), compiles the real train step for the
configured mesh, and reports per-device memory (the state's shards beside the ZeRO paper's
(2+2+K)Psi/N accounting, activations, and XLA's `memory_analysis` of the compiled step), FLOPs per step, and the
collectives and custom calls (Pallas/Mosaic, Triton, cuDNN kernels) in the compiled HLO. Every
backend-dependent choice (attention kernel, Pallas compiled or interpreted, bf16 dots, offload memory)
is made for the platform of the mesh compiled for, so `--target v5e:2x2` compiles what a v5e would run;
the plan names the attention and optimizer kernels it used. On a pipelined mesh it adds the schedule,
its bubble and the bytes the stages send (`llmx.pipeline`). `--no-compile` stops before compiling: the
state's bytes and the schedule. Every plan reports the activations per device; with `--max-seq-len` and a
`--target`, it searches for the longest `model.seq_len` whose step fits the target's memory on the
configured mesh (one AOT compile per probe): what `mesh.sequence=8` buys, before paying for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections import Counter

import jax
import numpy as np
from flax import nnx

from llmx import attention as attention_lib
from llmx import axes
from llmx import batch as batch_lib
from llmx import config as config_lib
from llmx import mesh as mesh_lib
from llmx import optim, targets
from llmx import pipeline as pipeline_lib
from llmx import sequence as sequence_lib
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.flops import flops_per_token
from llmx.mesh import abstract_with_shardings
from llmx.models import moe
from llmx.step import Steps, build_steps

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective instructions in HLO text by kind (async `-start` forms counted once, `-done` not)."""
    counts = Counter(m.group(1) for m in _COLLECTIVE_RE.finditer(hlo_text))
    return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


_CUSTOM_CALL_RE = re.compile(r'custom_call_target="([^"]+)"')
# How Pallas lowers on each platform (on CPU it only interprets, so the jnp reference runs instead).
PALLAS_LOWERING = {"tpu": "Mosaic", "gpu": "Triton", "cuda": "Triton", "rocm": "Triton"}


def custom_call_counts(hlo_text: str) -> dict[str, int]:
    """Custom calls in HLO text by target: tpu_custom_call (Mosaic: splash, Pallas kernels),
    __gpu$xla.gpu.triton (Pallas on GPU), __cudnn$fmha* (cuDNN attention), ..."""
    return dict(sorted(Counter(_CUSTOM_CALL_RE.findall(hlo_text)).items()))


def kernels(cfg: Config, mesh) -> dict[str, str]:
    """The attention and optimizer implementations a step compiled for `mesh` uses."""
    platform = mesh.devices.flat[0].platform
    attention = attention_lib.resolve(cfg.model.attention, cfg.model.dtype, platform, mesh.devices.size)
    if cfg.optim.impl == "optax":
        optimizer = f"optax {cfg.optim.name} (XLA-fused)"
    elif optim.fused_impl(mesh) == "pallas":
        optimizer = f"Pallas {cfg.optim.name} kernel ({PALLAS_LOWERING.get(platform, platform)}, compiled)"
    else:
        optimizer = f"jnp reference of the Pallas {cfg.optim.name} kernel (Pallas only interprets on {platform})"
    out = {"attention": f"{attention} (model.attention={cfg.model.attention})", "optimizer": optimizer}
    if cfg.model.family == "mixtral":
        out["experts"] = f"{moe.resolve_impl(cfg.model, platform)} (model.moe_impl={cfg.model.moe_impl})"
    return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StateMemory:
    """Per-device bytes of each copy of the weights, measured from shardings, and ZeRO's expectation."""

    n_params: int
    whole: int  # bytes of one unsharded copy of the state (params, grads, optimizer state)
    params: int
    grads: int
    opt_state: int
    expected_params: float
    expected_grads: float
    expected_opt_state: float

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state

    @property
    def expected_total(self) -> float:
        return self.expected_params + self.expected_grads + self.expected_opt_state


def zero_expectation(
    *, params: int, grads: int, opt_state: int, zero_stage: int, zero_group: int, tensor: int,
    pipeline: int = 1, stack_share: float = 1.0, expert: int = 1, expert_share: float = 0.0,
):
    """ZeRO §5.1 per device: stage 1 splits the optimizer state K·Psi over the N = `zero_group` devices
    (fsdp x sequence: `llmx.axes.ZERO_AXES`), stage 2
    also the gradients, stage 3 also the parameters; tensor parallelism splits everything by T
    (Megatron; norm scales, replicated there, are a rounding error); pipeline stages split the layer
    stack, `stack_share` of the bytes (the embedding and output projection stay on every stage). A mixture
    of experts' stacked experts, `expert_share` of the bytes, are split over `expert` at every stage (the
    ZeRO group, which includes the expert axis, then splits them no further than the rest)."""
    stages = stack_share / pipeline + (1 - stack_share)

    def split(nbytes, from_stage):
        if zero_stage >= from_stage:
            return nbytes * stages / tensor / zero_group
        return nbytes * stages / tensor * (expert_share / expert + 1 - expert_share)
    return split(params, 3), split(grads, 2), split(opt_state, 1)


def expert_bytes(abstract_params) -> int:
    """Bytes of the parameters stacked on the `experts` logical axis (a mixture of experts' experts)."""
    total = 0

    def visit(spec, value):
        nonlocal total
        if "experts" in tuple(spec):
            total += _total_bytes(value)
        return spec

    jax.tree.map(visit, nnx.get_partition_spec(abstract_params), abstract_params)  # as mesh.weight_shardings
    return total


def state_memory(cfg: Config, steps: Steps) -> StateMemory:
    params = abstract_with_shardings(steps.abstract_state.params, steps.state_shardings.params)
    trainable = steps.partition.split(steps.abstract_state.params)[0]  # all, or the LoRA adapters
    grads = abstract_with_shardings(trainable, steps.grad_shardings)
    opt = abstract_with_shardings(steps.abstract_state.opt_state, steps.state_shardings.opt_state)
    expected = zero_expectation(
        params=_total_bytes(params),
        grads=_total_bytes(grads),  # gradients have the trainable parameters' dtype
        opt_state=_total_bytes(opt),
        zero_stage=cfg.mesh.zero_stage,
        zero_group=axes.zero_group_size(dict(steps.mesh.shape)),
        tensor=steps.mesh.shape["tensor"],
        pipeline=steps.mesh.shape["pipeline"],
        stack_share=pipeline_lib.stack_bytes(params) / _total_bytes(params),
        expert=steps.mesh.shape["expert"],
        expert_share=expert_bytes(steps.abstract_state.params) / _total_bytes(params),
    )
    return StateMemory(
        n_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        whole=2 * _total_bytes(params) + _total_bytes(opt),
        params=per_device_bytes(params),
        grads=per_device_bytes(grads),
        opt_state=per_device_bytes(opt),
        expected_params=expected[0],
        expected_grads=expected[1],
        expected_opt_state=expected[2],
    )


def memory_report(cfg: Config, steps: Steps, state) -> str:
    """The start-up report: per-device bytes of each copy of the weights, measured on the live shards,
    beside ZeRO's expectation for this stage and mesh."""
    expected = state_memory(cfg, steps)
    grads = abstract_with_shardings(steps.partition.split(steps.abstract_state.params)[0], steps.grad_shardings)
    actual = {
        "params": sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state.params)),
        "grads": per_device_bytes(grads),  # gradients live only inside the step: from their shardings
        "opt_state": sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state.opt_state)),
    }
    wanted = {"params": expected.expected_params, "grads": expected.expected_grads,
              "opt_state": expected.expected_opt_state}
    parts = [f"{k} {actual[k] / 2**20:.2f} MiB (ZeRO-{cfg.mesh.zero_stage} expects {wanted[k] / 2**20:.2f})" for k in actual]
    return "per-device state: " + ", ".join(parts)


def peak_bytes(analysis) -> int:
    """A compiled step's per-device peak from XLA's memory analysis: its arguments (the state and the
    batch), outputs not written over donated arguments, and temporaries."""
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes)


def compile_train_step(cfg: Config, steps: Steps):
    state = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
    return steps.train.lower(state, batch_lib.abstract_batch(cfg, steps.mesh)).compile()


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0] if cost else None
    return cost or {}


def _roofline(*, model_flops: float, memory_bytes: float, chip, bubble: float = 0.0) -> dict:
    """A lower bound on step time: the slower of the chip's peak FLOP/s and its HBM bandwidth
    (collectives and overheads are not modelled), and the MFU it implies. A pipeline's stages compute
    only in 1 - bubble of the step (`llmx.pipeline.Schedule.bubble`)."""
    if chip is None:
        return {}
    seconds = max(model_flops / chip.peak_bf16_flops / (1 - bubble), memory_bytes / chip.hbm_bytes_per_second)
    return {"estimated_step_seconds": seconds, "estimated_mfu": model_flops / (seconds * chip.peak_bf16_flops)}


def compiler_out_of_memory(message: str) -> tuple[float, float] | None:
    """(bytes needed, bytes available) from XLA's "Ran out of memory on HBM" compile error."""
    m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
    return (float(m.group(1)) * 2**30, float(m.group(2)) * 2**30) if m else None


def tokens_per_device(cfg: Config, mesh) -> int:
    """Tokens one device holds activations of in a micro-step: its rows, its share of each sequence."""
    return cfg.train.micro_batch_size * cfg.model.seq_len // mesh.shape[sequence_lib.AXIS]


def _base(cfg: Config, target: str, steps: Steps, resolved, memory: StateMemory, tokens: int, model_flops: float) -> dict:
    mesh = steps.mesh
    parallel = sequence_lib.resolve(cfg, mesh)
    return {
        "target": target,
        "mesh": dict(mesh.shape),
        "zero_stage": cfg.mesh.zero_stage,
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
        "device_kind": resolved.chip.name if resolved.chip else mesh.devices.flat[0].device_kind,
        "parameters": memory.n_params,
        "tokens_per_step": tokens,
        "state_bytes": {"params": memory.params, "grads": memory.grads, "opt_state": memory.opt_state,
                        "total": memory.total},
        "zero_expected_bytes": {"params": memory.expected_params, "grads": memory.expected_grads,
                                "opt_state": memory.expected_opt_state, "total": memory.expected_total},
        "model_flops_per_step_per_device": model_flops,
        "seq_len": cfg.model.seq_len,
        "sequence_parallel": parallel.strategy if parallel else None,
        "tokens_per_device": tokens_per_device(cfg, mesh),
        "kernels": kernels(cfg, mesh),
    } | ({"pipeline": pipeline_lib.traffic(cfg, mesh, steps.pipeline, steps.abstract_state.params)}
         if steps.pipeline is not None else {})


def plan(cfg: Config, *, target: str = "current", devices=None, compile: bool = True,
         resolved: targets.Target | None = None) -> dict:
    """The plan as a JSON-ready dict (bytes and FLOPs are per device). `compile=False` stops at what the
    shapes and shardings tell (the state's bytes, the pipeline's schedule): seconds, where compiling a 1B
    step for a TPU target takes minutes. `resolved`: the target, already resolved (a search compiles many
    plans for one target)."""
    resolved = resolved or targets.resolve(target)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices if devices is not None else resolved.devices)
    steps = build_steps(cfg, mesh)
    memory = state_memory(cfg, steps)
    tokens = batch_lib.tokens_per_step(cfg, mesh)
    model_flops = flops_per_token(cfg.model) * tokens / mesh.size
    if not compile:
        return _base(cfg, target, steps, resolved, memory, tokens, model_flops)
    try:
        compiled = compile_train_step(cfg, steps)
    except jax.errors.JaxRuntimeError as e:
        refused = compiler_out_of_memory(str(e))
        if refused is None or resolved.chip is None:
            raise
        # The TPU compiler refuses a program that cannot fit: report its numbers as the verdict.
        return _base(cfg, target, steps, resolved, memory, tokens, model_flops) | {
            "activation_bytes": refused[0],
            "memory": {"hbm_bytes": resolved.chip.hbm_bytes, "fits": False, "shortfall_bytes": refused[0] - refused[1],
                       "compiler": f"temporaries need {refused[0] / 2**30:.2f} GiB of {refused[1] / 2**30:.2f} GiB available"},
        }
    analysis = compiled.memory_analysis()
    hlo = compiled.as_text()
    cost = _cost(compiled)
    peak = peak_bytes(analysis)
    result = _base(cfg, target, steps, resolved, memory, tokens, model_flops) | {
        "compiled_bytes": {
            "arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes,
            "aliased": analysis.alias_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "peak_estimate": peak,
        },
        # The step's temporaries: activations kept for the backward pass and transient buffers.
        "activation_bytes": analysis.temp_size_in_bytes,
        "xla_flops_per_step_per_device": cost.get("flops"),
        "collectives": collective_counts(hlo),
        "custom_calls": custom_call_counts(hlo),
    }
    if resolved.chip is not None:
        hbm = resolved.chip.hbm_bytes
        result["memory"] = {"hbm_bytes": hbm, "fits": peak <= hbm, "shortfall_bytes": max(0, peak - hbm)}
        bubble = steps.pipeline.bubble if steps.pipeline is not None else 0.0
        result.update(_roofline(model_flops=model_flops, memory_bytes=peak, chip=resolved.chip, bubble=bubble))
    return result


def _mb(n) -> str:
    return f"{n / 2**20:10.2f} MiB"


def format_plan(p: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"target {p['target']}: mesh {mesh}  zero_stage={p['zero_stage']}  ({p['devices']} x {p['device_kind']})",
        f"parameters {p['parameters'] / 1e6:.2f}M   tokens per step {p['tokens_per_step']}   seq_len {p['seq_len']}"
        + (f"   sequence-parallel: {p['sequence_parallel']}" if p["sequence_parallel"] else ""),
        f"attention {p['kernels']['attention']}   optimizer {p['kernels']['optimizer']}",
        "",
        f"{'per-device state':<22}{'actual':>14}{'ZeRO expects':>16}",
    ]
    for key, label in (("params", "parameters"), ("grads", "gradients"), ("opt_state", "optimizer state"), ("total", "total")):
        lines.append(f"  {label:<20}{_mb(p['state_bytes'][key]):>14}{_mb(p['zero_expected_bytes'][key]):>16}")
    lines += ["", "compiled train step, per device" if "compiled_bytes" in p else "train step not compiled (--no-compile)"]
    for key, value in p.get("compiled_bytes", {}).items():
        lines.append(f"  {key:<20}{_mb(value):>14}")
    if "activation_bytes" in p:
        lines.append(f"  {'activations':<20}{_mb(p['activation_bytes']):>14}   for {p['tokens_per_device']} tokens per "
                     "device (micro_batch_size x seq_len / sequence)")
    if "memory" in p:
        m = p["memory"]
        verdict = ("fits" if m["fits"] else f"does NOT fit: short by {m['shortfall_bytes'] / 2**30:.2f} GiB")
        lines.append(f"  {'HBM':<20}{_mb(m['hbm_bytes']):>14}   {verdict}")
        if "compiler" in m:
            lines.append(f"  the compiler refused the step: {m['compiler']}")
    xla = p.get("xla_flops_per_step_per_device")
    lines += ["", f"model FLOPs per step per device  {p['model_flops_per_step_per_device']:.3e}"
              + (f"   (XLA cost analysis {xla:.3e}; it counts a scanned layer once)" if xla else "")]
    if "estimated_step_seconds" in p:
        lines.append(f"roofline step time >= {p['estimated_step_seconds'] * 1e3:.1f} ms, MFU <= {p['estimated_mfu']:.0%}"
                     " (peak FLOP/s vs HBM bandwidth; collectives not modelled)")
    if "collectives" in p:
        lines.append("collectives  " + "  ".join(f"{k} {v}" for k, v in p["collectives"].items()))
    if p.get("custom_calls"):
        lines.append("custom calls  " + "  ".join(f"{k} {v}" for k, v in p["custom_calls"].items()))
    if "pipeline" in p:
        lines.append(pipeline_lib.describe_traffic(p["pipeline"]))
    return "\n".join(lines)


def seq_len_unit(sequence: int) -> int:
    """The granularity of the search: multiples of 512 tokens (the splash kernel's blocks) that split
    into 2 x sequence chunks."""
    return math.lcm(512, 2 * sequence)


def shortfall_bytes(p: dict) -> float:
    """How far a plan's step is over the target's memory (negative: the headroom left)."""
    m = p["memory"]
    if m["fits"]:
        return p["compiled_bytes"]["peak_estimate"] - m["hbm_bytes"]
    return m["shortfall_bytes"]


def longest_seq_len(cfg: Config, *, target: str, report=lambda probe: None) -> dict:
    """The longest `model.seq_len` (a multiple of `seq_len_unit`) whose train step fits `target`'s
    memory on the configured mesh. Every probe is an AOT compile (`plan`, passed to `report` as it
    finishes), so probes are few: growing from model.seq_len until one does not fit, then a bracketed
    search in units whose next probe is where the line through the bracket's memory shortfalls crosses
    zero (memory grows about linearly in seq_len; the Illinois variant of regula falsi where it does not)."""
    resolved = targets.resolve(target)
    if resolved.chip is None:
        raise ConfigError("--max-seq-len needs a --target with known device memory (e.g. v5e:2x2 or h100:1x1x8)")
    unit = seq_len_unit(mesh_lib.mesh_shape(cfg.mesh, len(resolved.devices))[sequence_lib.AXIS])
    probes: dict[int, dict] = {}

    def probe(units: int) -> float:
        p = plan(cfg.replace(model={"seq_len": units * unit}), target=target, resolved=resolved)
        probes[units] = p
        report(p)
        return shortfall_bytes(p)

    lo, hi = 0, max(1, cfg.model.seq_len // unit)  # lo fits (0: nothing yet), hi is the next probe
    while (short := probe(hi)) <= 0:
        # Grow by what the headroom suggests if activations grow linearly (2x to 16x), past the answer.
        p = probes[hi]
        activations = p["compiled_bytes"]["peak_estimate"] - p["state_bytes"]["total"]
        room = p["memory"]["hbm_bytes"] - p["state_bytes"]["total"]
        lo, hi = hi, hi * min(max(2, math.ceil(1.25 * room / max(activations, 1))), 16)
    short_lo = shortfall_bytes(probes[lo]) if lo else None
    moved = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if short_lo is not None:  # where the line through (lo, short_lo) and (hi, short) crosses zero
            mid = min(max(lo + int((hi - lo) * -short_lo / (short - short_lo)), lo + 1), hi - 1)
        if probe(mid) <= 0:
            lo, short_lo = mid, shortfall_bytes(probes[mid])
            short = short / 2 if moved == "lo" else short  # Illinois: a far end kept twice counts less
            moved = "lo"
        else:
            hi, short = mid, shortfall_bytes(probes[mid])
            short_lo = short_lo / 2 if moved == "hi" and short_lo is not None else short_lo
            moved = "hi"
    return {"target": target, "mesh": next(iter(probes.values()))["mesh"], "max_seq_len": lo * unit, "unit": unit,
            "probes": [{"seq_len": p["seq_len"], "fits": p["memory"]["fits"], "activation_bytes": p["activation_bytes"]}
                       for _, p in sorted(probes.items())]}


def _probe_line(p: dict) -> str:
    verdict = "fits" if p["memory"]["fits"] else "does not fit"
    return f"seq_len {p['seq_len']:>8}: activations {p['activation_bytes'] / 2**30:7.2f} GiB per device, {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--target", default="current",
                        help="current (local devices), a TPU topology (v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2) "
                        "or a GPU target (h100:1x1x8, h200:1x1x8, a100:1x1x8)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="stop at the state's per-device bytes and the pipeline's schedule (no compiled step)")
    parser.add_argument("--max-seq-len", action="store_true",
                        help="search for the longest model.seq_len that fits the target (one AOT compile per probe)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = config_lib.load(args.config, args.overrides)
    if not args.max_seq_len:
        result = plan(cfg, target=args.target, compile=args.compile)
        print(json.dumps(result, indent=2) if args.json else format_plan(result))
        return 0
    report = (lambda p: None) if args.json else (lambda p: print(_probe_line(p), flush=True))
    found = longest_seq_len(cfg, target=args.target, report=report)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        mesh = " ".join(f"{k}={v}" for k, v in found["mesh"].items())
        print(f"longest model.seq_len that fits {args.target} with mesh {mesh}: {found['max_seq_len']} "
              f"(multiples of {found['unit']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
