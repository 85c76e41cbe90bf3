"""Every key of DeepSpeed's config schema, by what llmx does with it, and the check of a ds_config.

DeepSpeed reads its config leniently: a misspelt key is silently ignored. llmx does not: each key is
known here (read from DeepSpeed edaa722: runtime/config.py `_initialize_params`, runtime/constants.py,
zero/config.py, zero/offload_config.py, precision_config.py, activation_checkpointing/config.py,
monitor/config.py, profiling/config.py, ops/adam/fused_adam.py, ops/lamb/fused_lamb.py,
runtime/lr_schedules.py) as one of
- mapped: translated into llmx keys (`llmx.ds_translate`);
- ignored: no analogue, because XLA does that job (bucketing, overlap, prefetch, memory layout):
  accepted, and listed in one warning line;
- a feature llmx lacks (parameter offload, NVMe, 1-bit optimizers, ZeRO++ quantized collectives,
  compression, sparse attention...): an error naming it when the value turns it on.
Anything else is an unknown key: an error naming the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from llmx.errors import ConfigError

MAPPED, IGNORED, FEATURE, SECTION, PARAMS = "mapped", "ignored", "feature", "section", "params"
AUTO = "auto"


def _truthy(value) -> bool:
    return bool(value) and value != AUTO


def _enabled(value) -> bool:
    return isinstance(value, dict) and _truthy(value.get("enabled", False))


def _always(value) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Key:
    kind: str = MAPPED
    types: tuple = ()  # accepted JSON types of a mapped key (empty: any)
    choices: tuple = ()  # accepted values (strings compare case-insensitively)
    auto: bool = True  # "auto" accepted: the llmx config's value stands
    lacks: str = ""  # a feature llmx lacks...
    on: Callable[[Any], bool] = _truthy  # ...which this value turns on
    keys: dict | None = None  # a section's keys


def mapped(*types, choices=(), auto=True, lacks="", on=_truthy) -> Key:
    return Key(MAPPED, types=types, choices=choices, auto=auto, lacks=lacks, on=on)


def section(keys: dict, *, lacks="", on=_truthy) -> Key:
    return Key(SECTION, keys=keys, lacks=lacks, on=on)


def lacks(feature: str, on=_truthy) -> Key:
    return Key(FEATURE, lacks=feature, on=on)


IGNORE = Key(IGNORED)
TYPED_PARAMS = Key(PARAMS)  # optimizer.params, scheduler.params: checked by their type's table
INT, NUM, BOOL, STR = (int,), (int, float), (bool,), (str,)

OFFLOAD_OPTIMIZER = {
    "device": mapped(str, choices=("cpu", "none", "nvme"), lacks="optimizer offload to NVMe (ZeRO-Infinity)",
                     on=lambda v: str(v).lower() == "nvme"),
    "ratio": mapped(*NUM, lacks="partial optimizer offload (ratio < 1)", on=lambda v: v != 1),
    "super_offload": lacks("SuperOffload"),
    **dict.fromkeys(("nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write", "fast_init",
                     "cpuadam_cores_perc"), IGNORE),
}

ZERO = {
    "stage": mapped(int, choices=(0, 1, 2, 3)),
    "offload_optimizer": section(OFFLOAD_OPTIMIZER),
    "cpu_offload": mapped(bool),  # deprecated spelling of offload_optimizer.device=cpu
    "zero_hpz_partition_size": mapped(int),
    "mics_shard_size": mapped(int),
    "offload_param": lacks("parameter offload to CPU/NVMe",
                           on=lambda v: isinstance(v, dict) and v.get("device", "none") not in ("none", None)),
    "cpu_offload_param": lacks("parameter offload to CPU/NVMe"),
    "zero_quantized_weights": lacks("ZeRO++ quantized weight all-gather (qwZ)"),
    "zero_quantized_nontrainable_weights": lacks("ZeRO++ quantized frozen weights"),
    "zero_quantized_gradients": lacks("ZeRO++ quantized gradient reduce-scatter (qgZ)"),
    "zeropp_loco_param": lacks("ZeRO++ LoCo error feedback", on=lambda v: v is not None),
    "zenflow": lacks("ZenFlow", on=lambda v: v is not None),
    **dict.fromkeys((
        "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
        "allgather_partitions", "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights",
        "elastic_checkpoint", "sub_group_size", "cpu_offload_use_pin_memory",
        "prefetch_bucket_size", "stage3_prefetch_bucket_size",
        "param_persistence_threshold", "stage3_param_persistence_threshold",
        "model_persistence_threshold", "stage3_model_persistence_threshold",
        "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
        "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save", "module_granularity_threshold",
        "stage3_module_granularity_threshold", "use_all_reduce_for_fetch_params",
        "stage3_use_all_reduce_for_fetch_params", "allgather_sequential", "stage3_allgather_sequential",
        "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients", "mics_hierarchical_params_gather",
        "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
        "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory", "leaf_module",
    ), IGNORE),
}

FP16 = {
    "enabled": mapped(bool),
    "loss_scale": mapped(*NUM),
    "initial_scale_power": mapped(int),
    "loss_scale_window": mapped(*NUM),
    "hysteresis": mapped(int),
    "min_loss_scale": mapped(*NUM),
    "consecutive_hysteresis": lacks("fp16 consecutive_hysteresis (llmx refills hysteresis only when the scale grows)"),
    "fp16_master_weights_and_grads": lacks("fp16 master weights (llmx keeps fp32 master weights)"),
    "auto_cast": IGNORE,
}

BF16 = {
    "enabled": mapped(bool),
    "bf16_master_weights_and_grads": lacks("bf16 master weights (llmx keeps fp32 master weights)"),
    "bf16_optimizer_states": lacks("bf16 optimizer states (llmx keeps fp32 moments)"),
    **dict.fromkeys(("immediate_grad_update", "check_grad_overflow", "check_overflow"), IGNORE),
}

ACTIVATION_CHECKPOINTING = {
    "partition_activations": mapped(bool),
    "cpu_checkpointing": mapped(bool),
    **dict.fromkeys(("number_checkpoints", "contiguous_memory_optimization", "synchronize_checkpoint_boundary",
                     "profile"), IGNORE),
}

FLOPS_PROFILER = {
    "enabled": mapped(bool),
    "profile_step": mapped(int),
    **dict.fromkeys(("module_depth", "top_modules", "detailed", "output_file", "recompute_fwd_factor"), IGNORE),
}

MONITOR = {"enabled": mapped(bool), "output_path": mapped(str), "job_name": mapped(str)}

TOP = {
    "train_batch_size": mapped(int),
    "train_micro_batch_size_per_gpu": mapped(int),
    "gradient_accumulation_steps": mapped(int),
    "optimizer": section({"type": mapped(str, auto=False), "params": TYPED_PARAMS, "legacy_fusion": IGNORE}),
    "scheduler": section({"type": mapped(str, auto=False), "params": TYPED_PARAMS}),
    "gradient_clipping": mapped(*NUM),
    "fp16": section(FP16),
    "bf16": section(BF16),
    "bfloat16": section(BF16),  # DeepSpeed's older spelling
    "zero_optimization": section(ZERO),
    "activation_checkpointing": section(ACTIVATION_CHECKPOINTING),
    "steps_per_print": mapped(int),
    "flops_profiler": section(FLOPS_PROFILER),
    "tensorboard": section(MONITOR),
    "csv_monitor": section(MONITOR),
    "tensor_parallel": section({"autotp_size": mapped(int), "tp_size": mapped(int),
                                **dict.fromkeys(("tp_grain_size", "tp_overlap_comm", "dtype", "tp"), IGNORE)}),
    "wandb": lacks("the Weights & Biases monitor (llmx writes metrics.jsonl and TensorBoard)", on=_enabled),
    "comet": lacks("the Comet monitor (llmx writes metrics.jsonl and TensorBoard)", on=_enabled),
    "amp": lacks("NVIDIA Apex AMP (use fp16 or bf16)", on=_enabled),
    "torch_autocast": lacks("torch.autocast (use fp16 or bf16)", on=_enabled),
    "sparse_attention": lacks("block-sparse attention", on=_always),
    "compression_training": lacks(
        "compression training (llmx has model.quantization=int8|fp8 and optim.prune_*; no layer reduction)", on=_always),
    "weight_quantization": lacks("weight quantization (llmx: python -m llmx.quantize on the trained run)", on=_always),
    "quantize_training": lacks("MoQ quantize training (llmx: model.quantization=int8)", on=_enabled),
    "progressive_layer_drop": lacks("progressive layer drop", on=_enabled),
    "curriculum_learning": lacks("curriculum learning", on=_enabled),
    "data_efficiency": lacks("data efficiency (curriculum, random-LTD)", on=_enabled),
    "eigenvalue": lacks("Hessian eigenvalue computation", on=_enabled),
    "autotuning": lacks("the autotuner (try layouts with python -m llmx.plan)", on=_enabled),
    "elasticity": lacks("elastic training", on=_enabled),
    "hybrid_engine": lacks("the RLHF hybrid engine", on=_enabled),
    "pipeline": lacks("DeepSpeed's PipelineModule settings; llmx pipelines with mesh.pipeline, mesh.pipeline_repeats", on=_always),
    "expert_parallel": lacks("expert parallelism", on=_always),
    "sequence_parallel_size": mapped(int),
    "nebula": lacks("Nebula checkpointing (llmx checkpoints with Orbax)", on=_enabled),
    "datastates_ckpt": lacks("DataStates checkpointing (llmx checkpoints with Orbax)", on=_always),
    "sparse_gradients": lacks("sparse embedding gradients"),
    "fp16_master_weights_and_grads": lacks("fp16 master weights (llmx keeps fp32 master weights)"),
    **dict.fromkeys((
        "managed_gradient_accumulation", "dump_state", "disable_allgather", "communication_data_type",
        "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor",
        "gradient_allreduce_op", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
        "wall_clock_breakdown", "memory_breakdown", "comms_logger", "graph_harvesting", "checkpoint", "data_types",
        "aio", "dataloader_drop_last", "log_level", "compile", "timers", "use_data_before_expert_parallelism",
        "vocabulary_size",
    ), IGNORE),
}

# optimizer.type (lower case) -> its params. FusedAdam serves Adam and AdamW, torch.optim.SGD serves SGD.
_ADAM = {
    **dict.fromkeys(("lr", "eps", "weight_decay"), mapped(*NUM)),
    "betas": mapped(list),
    "adam_w_mode": mapped(bool),
    "torch_adam": mapped(bool),
    "bias_correction": mapped(bool, lacks="Adam without bias correction", on=lambda v: v is False),
    "amsgrad": lacks("AMSGrad"),
    "maximize": lacks("maximize"),
    **dict.fromkeys(("set_grad_none", "fp32_optimizer_states", "foreach", "capturable", "differentiable", "fused"),
                    IGNORE),
}
OPTIMIZER_PARAMS = {
    "adam": _ADAM,
    "adamw": _ADAM,
    "lamb": {
        **dict.fromkeys(("lr", "eps", "weight_decay"), mapped(*NUM)),
        "betas": mapped(list),
        "bias_correction": mapped(bool, lacks="LAMB without bias correction", on=lambda v: v is False),
        "max_coeff": mapped(*NUM, lacks="LAMB's trust-ratio clamp, which optax's LAMB lacks",
                            on=lambda v: v != 10.0),
        "min_coeff": mapped(*NUM, lacks="LAMB's trust-ratio clamp, which optax's LAMB lacks",
                            on=lambda v: v != 0.01),
        "eps_inside_sqrt": lacks("LAMB eps_inside_sqrt"),
        "amsgrad": lacks("AMSGrad"),
    },
    "sgd": {
        **dict.fromkeys(("lr", "momentum", "weight_decay"), mapped(*NUM)),
        "nesterov": mapped(bool),
        "dampening": mapped(*NUM, lacks="SGD dampening", on=lambda v: v != 0),
        "maximize": lacks("maximize"),
        **dict.fromkeys(("foreach", "differentiable", "fused"), IGNORE),
    },
}
# Every param of every optimizer rejects max_grad_norm, as DeepSpeed does (engine.py).
for _params in OPTIMIZER_PARAMS.values():
    _params["max_grad_norm"] = lacks("max_grad_norm in optimizer.params (DeepSpeed rejects it too: use gradient_clipping)",
                                     on=_always)
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "sgd": "SGD"}
OPTIMIZERS_LLMX_LACKS = {
    "onebitadam": "1-bit Adam", "zerooneadam": "0/1 Adam", "onebitlamb": "1-bit LAMB", "adagrad": "Adagrad",
    "lion": "Lion", "muon": "Muon", "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD",
    "rmsprop": "RMSprop", "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam",
    "asgd": "ASGD", "rprop": "Rprop", "lbfgs": "L-BFGS", "sparseadam": "SparseAdam",
}

_WARMUP = {
    **dict.fromkeys(("warmup_min_lr", "warmup_max_lr"), mapped(*NUM)),
    "warmup_num_steps": mapped(int),
    "warmup_type": mapped(str, choices=("log", "linear")),
    "last_batch_iteration": IGNORE,
}
SCHEDULER_PARAMS = {
    "warmuplr": _WARMUP,
    "warmupdecaylr": {**_WARMUP, "total_num_steps": mapped(int)},
    "warmupcosinelr": {
        "total_num_steps": mapped(int),
        "warmup_num_steps": mapped(int),
        **dict.fromkeys(("warmup_min_ratio", "cos_min_ratio"), mapped(*NUM)),
        "warmup_type": mapped(str, choices=("log", "linear")),
        "last_batch_iteration": IGNORE,
    },
    "onecycle": {
        **dict.fromkeys(("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_min_mom", "cycle_max_mom",
                         "decay_mom_rate"), mapped(*NUM)),
        **dict.fromkeys(("cycle_first_step_size", "cycle_second_step_size", "cycle_first_stair_count",
                         "cycle_second_stair_count", "decay_step_size"), mapped(int)),
        "cycle_momentum": mapped(bool),
        "last_batch_iteration": IGNORE,
    },
}
SCHEDULERS = {"warmuplr": "WarmupLR", "warmupdecaylr": "WarmupDecayLR", "warmupcosinelr": "WarmupCosineLR",
              "onecycle": "OneCycle"}
SCHEDULERS_LLMX_LACKS = {"lrrangetest": "the LR range test (LRRangeTest)"}


@dataclasses.dataclass
class Findings:
    ignored: list[str] = dataclasses.field(default_factory=list)  # paths with no analogue
    lacking: list[str] = dataclasses.field(default_factory=list)  # "path (feature)"


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not match:  # a wrong case weighs heavily in difflib's ratio: compare case-insensitively too
        lowered = {k.lower(): k for k in known}
        match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
        match = [lowered[m] for m in match]
    return match[0] if match else ""


def unknown(path: str, name: str, known) -> ConfigError:
    closest = _closest(name, known)
    prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = f"did you mean '{prefix}{closest}'?" if closest else "see the README's 'From DeepSpeed' table"
    return ConfigError(f"unknown DeepSpeed config key '{path}'; {hint}")


def _type_ok(value, types: tuple) -> bool:
    if not types:
        return True
    if isinstance(value, bool):
        return bool in types
    if int in types and isinstance(value, float) and value.is_integer():
        return True  # JSON writes 1e9 for an integer
    return isinstance(value, types)


def _type_name(types: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    return " or ".join(names[t] for t in types if not (t is int and float in types))


def _check_value(path: str, key: Key, value, findings: Findings) -> None:
    if value == AUTO and key.auto:
        return
    if not _type_ok(value, key.types):
        extra = ' or "auto"' if key.auto else ""
        raise ConfigError(f"DeepSpeed key {path}={value!r} must be {_type_name(key.types)}{extra}")
    if key.choices:
        folded = value.lower() if isinstance(value, str) else value
        if folded not in key.choices:
            raise ConfigError(f"DeepSpeed key {path}={value!r} must be one of: {', '.join(map(str, key.choices))}")
    if key.lacks and key.on(value):
        findings.lacking.append(f"{path} ({key.lacks})")


def _walk(values: dict, schema: dict, path: str, findings: Findings) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"DeepSpeed key {path} must be a JSON object, not {type(values).__name__}")
    for name, value in values.items():
        here = f"{path}.{name}" if path else name
        if name not in schema:
            raise unknown(here, name, schema)
        key = schema[name]
        if key.kind == IGNORED:
            findings.ignored.append(here)
        elif key.kind == FEATURE:
            if key.on(value):
                findings.lacking.append(f"{here} ({key.lacks})")
        elif key.kind == SECTION:
            _walk(value, key.keys, here, findings)
        elif key.kind == PARAMS:
            continue
        else:
            _check_value(here, key, value, findings)


def _typed_params(ds: dict, section_name: str, tables: dict, lacking_types: dict, names: dict,
                  findings: Findings) -> None:
    """optimizer / scheduler: the params a `type` takes depend on the type."""
    block = ds.get(section_name)
    if block is None:
        return
    kind = block.get("type")
    if kind is None:
        raise ConfigError(f"DeepSpeed key {section_name}.type is missing; name the {section_name}")
    folded = str(kind).lower()
    if folded in lacking_types:
        findings.lacking.append(f"{section_name}.type={kind} ({lacking_types[folded]})")
        return
    if folded not in tables:
        known = list(names.values())
        closest = _closest(str(kind), known)
        hint = f"did you mean '{closest}'?" if closest else f"llmx maps {', '.join(known)}"
        raise ConfigError(f"unknown DeepSpeed {section_name}.type '{kind}'; {hint}")
    _walk(block.get("params") or {}, tables[folded], f"{section_name}.params", findings)


def check(ds: dict) -> Findings:
    """Raises a ConfigError for an unknown key, a wrong type, or features llmx lacks (all of them named
    in one line); returns what was found, including the keys with no analogue."""
    findings = Findings()
    _walk(ds, TOP, "", findings)
    _typed_params(ds, "optimizer", OPTIMIZER_PARAMS, OPTIMIZERS_LLMX_LACKS, OPTIMIZERS, findings)
    _typed_params(ds, "scheduler", SCHEDULER_PARAMS, SCHEDULERS_LLMX_LACKS, SCHEDULERS, findings)
    raise_lacking(findings.lacking)
    return findings


def raise_lacking(lacking: list[str]) -> None:
    if lacking:
        raise ConfigError("ds_config turns on DeepSpeed features llmx lacks: " + "; ".join(lacking)
                          + ". Remove them or turn them off")
