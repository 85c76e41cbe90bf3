"""A checked ds_config -> llmx config values, each with the DeepSpeed key it came from.

What DeepSpeed's engine owns follows DeepSpeed's own defaults when the ds_config leaves it out:
no fp16/bf16 section is fp32, no zero_optimization is stage 0 (plain data parallelism over every
device), no gradient_clipping is DeepSpeed's 1.0, an optimizer without a scheduler keeps a constant
lr, and optimizer/scheduler params take FusedAdam's, FusedLamb's, torch SGD's and the schedulers'
defaults. "auto" (the Hugging Face integration's word) keeps the llmx config's value. The batch is
resolved last (`batch`), because it needs the data-parallel size of the mesh the rest produced.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llmx.config import Config
from llmx.ds_keys import AUTO, raise_lacking
from llmx.errors import ConfigError


@dataclasses.dataclass
class Translation:
    values: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # section -> key -> value
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # "section.key" -> where it came from

    def set(self, key: str, value, source: str) -> None:
        section, name = key.split(".", 1)
        self.values.setdefault(section, {})[name] = value
        self.sources[key] = source

    def get(self, key: str, default=None):
        section, name = key.split(".", 1)
        return self.values.get(section, {}).get(name, default)


def _given(block: dict, key: str) -> bool:
    return key in block and block[key] != AUTO


def _number(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _set_from(out: Translation, block: dict, path: str, pairs: dict[str, str], defaults: dict | None = None,
              default_source: str = "") -> None:
    """For each DeepSpeed key -> llmx key: the ds value (or the DeepSpeed default); "auto" leaves llmx's."""
    for ds_key, llmx_key in pairs.items():
        if _given(block, ds_key):
            out.set(llmx_key, _number(block[ds_key]), f"{path}.{ds_key}")
        elif ds_key not in block and defaults is not None and ds_key in defaults:
            out.set(llmx_key, defaults[ds_key], f"{path}.{ds_key} absent: {default_source} default")


def _precision(ds: dict, out: Translation) -> None:
    bf16_name = "bf16" if "bf16" in ds else "bfloat16"
    fp16, bf16 = ds.get("fp16") or {}, ds.get(bf16_name) or {}
    fp16_on, bf16_on = fp16.get("enabled", False), bf16.get("enabled", False)
    if fp16_on is True and bf16_on is True:
        raise ConfigError("ds_config enables both fp16 and bf16 (DeepSpeed refuses this too); enable one")
    if fp16_on is True:
        precision, source = "fp16", "fp16.enabled"
    elif bf16_on is True:
        precision, source = "bf16", f"{bf16_name}.enabled"
    elif AUTO in (fp16_on, bf16_on):
        precision = None  # the llmx config's precision
    else:
        precision, source = "fp32", "no fp16/bf16 enabled (DeepSpeed trains in fp32)"
    if precision is not None:
        out.set("train.precision", precision, source)
        out.set("model.dtype", "auto", f"{source}; compute dtype from train.precision")
    _set_from(out, fp16, "fp16", {"loss_scale": "train.loss_scale", "initial_scale_power": "train.initial_scale_power",
                                  "loss_scale_window": "train.loss_scale_window", "hysteresis": "train.hysteresis",
                                  "min_loss_scale": "train.min_loss_scale"})


def _mesh(ds: dict, cfg: Config, out: Translation) -> None:
    """ZeRO shards over every data-parallel device: llmx's fsdp axis takes them all, or the hpZ/MiCS
    group with plain replicas (mesh.data) across groups. Tensor and sequence parallelism take theirs first."""
    tp = ds.get("tensor_parallel") or {}
    for key in ("autotp_size", "tp_size"):
        if _given(tp, key) and tp[key] > 1:
            out.set("mesh.tensor", int(tp[key]), f"tensor_parallel.{key}")
    if _given(ds, "sequence_parallel_size") and ds["sequence_parallel_size"] > 1:
        # DeepSpeed-Ulysses; as there, ZeRO shards over sequence x data-parallel ranks and the batch rule's
        # data-parallel size leaves the sequence ranks out.
        out.set("mesh.sequence", int(ds["sequence_parallel_size"]), "sequence_parallel_size")
        out.set("mesh.sequence_strategy", "ulysses", "sequence_parallel_size: DeepSpeed-Ulysses")
    zero = ds.get("zero_optimization")
    zero = {} if zero is None else zero
    stage = zero.get("stage", 0)
    if stage == AUTO:
        return
    source = "zero_optimization.stage" if "stage" in zero else "no zero_optimization.stage: DeepSpeed's stage 0"
    out.set("mesh.zero_stage", int(stage), source)
    group, group_key = 1, ""
    for key in ("zero_hpz_partition_size", "mics_shard_size"):
        if _given(zero, key) and zero[key] > 1:
            if group > 1:
                raise ConfigError("ds_config sets both zero_hpz_partition_size and mics_shard_size; give one group size")
            group, group_key = int(zero[key]), f"zero_optimization.{key}"
    if out.get("mesh.tensor", cfg.mesh.tensor) == -1:
        raise ConfigError("mesh.tensor=-1 cannot be combined with a ds_config (its data parallelism takes the "
                          "devices left over); give mesh.tensor a size")
    if group > 1:
        out.set("mesh.fsdp", group, f"{group_key}: a ZeRO group of {group}")
        out.set("mesh.data", -1, f"{group_key}: replicas across ZeRO groups")
    elif stage >= 1:
        out.set("mesh.fsdp", -1, f"{source}={stage}: ZeRO shards over every data-parallel device")
        out.set("mesh.data", 1, f"{source}={stage}: no replicas outside the ZeRO group")
    else:
        out.set("mesh.fsdp", 1, f"{source}=0: plain data parallelism")
        out.set("mesh.data", -1, f"{source}=0: plain data parallelism over every device")
    offload = zero.get("offload_optimizer") or {}
    if _given(offload, "device"):
        out.set("mesh.offload_optimizer", offload["device"].lower() == "cpu", "zero_optimization.offload_optimizer.device")
    elif _given(zero, "cpu_offload"):
        out.set("mesh.offload_optimizer", zero["cpu_offload"], "zero_optimization.cpu_offload")
    elif "offload_optimizer" not in zero and "cpu_offload" not in zero:
        out.set("mesh.offload_optimizer", False, "no zero_optimization.offload_optimizer: DeepSpeed keeps it on device")


# DeepSpeed's optimizer classes' defaults (ops/adam/fused_adam.py, ops/lamb/fused_lamb.py, torch.optim.SGD).
_FUSED_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
_SGD_DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}
_LLMX_OPTIMIZER = {"adam": "adamw", "adamw": "adamw", "lamb": "lamb", "sgd": "sgd"}


def _optimizer(ds: dict, cfg: Config, out: Translation) -> None:
    opt = ds.get("optimizer")
    if opt is None:
        return
    kind, params = opt["type"].lower(), opt.get("params") or {}
    out.set("optim.name", _LLMX_OPTIMIZER[kind], f"optimizer.type={opt['type']}")
    if kind == "sgd":
        _set_from(out, params, "optimizer.params", {"lr": "optim.lr", "momentum": "optim.momentum",
                  "weight_decay": "optim.weight_decay", "nesterov": "optim.nesterov"}, _SGD_DEFAULTS, "torch.optim.SGD")
        return
    cls = "FusedLamb" if kind == "lamb" else "FusedAdam"
    defaults = dict(_FUSED_DEFAULTS)
    decoupled = kind == "adamw" or params.get("adam_w_mode", True) is not False  # engine.py effective_adam_w_mode
    if params.get("torch_adam") is True:
        cls = "torch.optim.AdamW" if decoupled else "torch.optim.Adam"
        defaults["weight_decay"] = 0.01 if decoupled else 0.0
    _set_from(out, params, "optimizer.params", {"lr": "optim.lr", "eps": "optim.eps", "weight_decay": "optim.weight_decay"},
              defaults, cls)
    betas = params.get("betas", defaults["betas"])
    if betas != AUTO:
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
            raise ConfigError(f"DeepSpeed key optimizer.params.betas={betas!r} must be two numbers")
        source = "optimizer.params.betas" if "betas" in params else f"optimizer.params.betas absent: {cls} default"
        out.set("optim.b1", float(betas[0]), source)
        out.set("optim.b2", float(betas[1]), source)
    weight_decay = out.get("optim.weight_decay", cfg.optim.weight_decay)
    if not decoupled and weight_decay > 0:
        raise_lacking([f"optimizer.params.adam_w_mode=false with weight_decay {weight_decay:g} (Adam with L2 "
                       "decay added to the gradient; llmx's AdamW decays decoupled)"])


def _schedule_steps(params: dict, name: str, out: Translation, *, required: bool) -> None:
    if _given(params, "total_num_steps"):
        out.set("optim.schedule_steps", int(params["total_num_steps"]), "scheduler.params.total_num_steps")
    elif required and "total_num_steps" not in params:
        raise ConfigError(f"DeepSpeed's {name} needs scheduler.params.total_num_steps")


def _warmup(params: dict, name: str, out: Translation) -> None:
    steps = params.get("warmup_num_steps", 1000)
    if steps != AUTO and (int(steps) != steps or steps <= 0):
        raise ConfigError(f"DeepSpeed's {name} needs warmup_num_steps to be a positive integer, not {steps!r}")
    _set_from(out, params, "scheduler.params", {"warmup_num_steps": "optim.warmup_steps"}, {"warmup_num_steps": 1000},
              name)
    if _given(params, "warmup_type"):
        out.set("optim.warmup_type", params["warmup_type"].lower(), "scheduler.params.warmup_type")
    elif "warmup_type" not in params:
        out.set("optim.warmup_type", "log", f"scheduler.params.warmup_type absent: {name} default")


def _scheduler(ds: dict, cfg: Config, out: Translation) -> None:
    sched = ds.get("scheduler")
    if sched is None:
        if "optimizer" in ds:
            out.set("optim.schedule", "constant", "no scheduler: DeepSpeed keeps the optimizer's lr")
            out.set("optim.warmup_steps", 0, "no scheduler: DeepSpeed keeps the optimizer's lr")
        return
    kind, params, name = sched["type"].lower(), sched.get("params") or {}, sched["type"]
    path = "scheduler.params"
    if kind in ("warmuplr", "warmupdecaylr"):
        out.set("optim.schedule", "warmup_lr" if kind == "warmuplr" else "warmup_decay_lr", f"scheduler.type={name}")
        _warmup(params, name, out)
        # WarmupLR's warmup_max_lr defaults to the optimizer's lr, WarmupDecayLR's to 0.001.
        max_default = {} if kind == "warmuplr" else {"warmup_max_lr": 0.001}
        _set_from(out, params, path, {"warmup_min_lr": "optim.warmup_min_lr", "warmup_max_lr": "optim.lr"},
                  {"warmup_min_lr": 0.0, **max_default}, name)
        _schedule_steps(params, name, out, required=kind == "warmupdecaylr")
    elif kind == "warmupcosinelr":
        out.set("optim.schedule", "warmup_cosine_lr", f"scheduler.type={name}")
        _warmup(params, name, out)
        _schedule_steps(params, name, out, required=True)
        _set_from(out, params, path, {"cos_min_ratio": "optim.min_lr_ratio"}, {"cos_min_ratio": 0.0001}, name)
        ratio = params.get("warmup_min_ratio", 0.0)
        if ratio != AUTO:  # the ratio of the optimizer's lr, as an absolute lr
            lr = out.get("optim.lr", cfg.optim.lr)
            source = f"{path}.warmup_min_ratio {ratio:g} x lr {lr:g}"
            out.set("optim.warmup_min_lr", ratio * lr, source if "warmup_min_ratio" in params else f"{source} (default)")
    elif kind == "onecycle":
        _one_cycle(params, cfg, out)


def _one_cycle(params: dict, cfg: Config, out: Translation) -> None:
    path, name = "scheduler.params", "OneCycle"
    for key in ("cycle_min_lr", "cycle_max_lr"):
        if key not in params:
            raise ConfigError(f"DeepSpeed's OneCycle needs scheduler.params.{key}")
    first = params.get("cycle_first_step_size", 2000)
    if first != AUTO and first <= 0:
        raise ConfigError(f"DeepSpeed's OneCycle needs cycle_first_step_size > 0, not {first!r}")
    optimizer = out.get("optim.name", cfg.optim.name)
    if params.get("cycle_momentum", True) is True and optimizer in ("adamw", "lamb"):
        raise_lacking([f"{path}.cycle_momentum (OneCycle cycles beta1 of {optimizer}, DeepSpeed's default; llmx keeps "
                       "optim.b1 fixed: set \"cycle_momentum\": false)"])
    out.set("optim.schedule", "one_cycle_linear", "scheduler.type=OneCycle")
    _set_from(out, params, path, {
        "cycle_min_lr": "optim.warmup_min_lr", "cycle_max_lr": "optim.lr", "cycle_first_step_size": "optim.warmup_steps",
        "cycle_second_step_size": "optim.cycle_down_steps", "cycle_first_stair_count": "optim.cycle_up_stairs",
        "cycle_second_stair_count": "optim.cycle_down_stairs", "decay_step_size": "optim.cycle_decay_every",
        "decay_lr_rate": "optim.cycle_decay_rate",
    }, {"cycle_first_step_size": 2000, "cycle_second_step_size": -1, "cycle_first_stair_count": 0,
        "cycle_second_stair_count": -1, "decay_step_size": 0, "decay_lr_rate": 0.0}, name)


def _training(ds: dict, out: Translation) -> None:
    if _given(ds, "gradient_clipping"):
        out.set("optim.grad_clip", float(ds["gradient_clipping"]), "gradient_clipping")
    elif "gradient_clipping" not in ds:
        out.set("optim.grad_clip", 1.0, "no gradient_clipping: DeepSpeed's default 1.0")
    if _given(ds, "steps_per_print"):
        out.set("train.log_every", int(ds["steps_per_print"]), "steps_per_print")
    checkpointing = ds.get("activation_checkpointing")
    if checkpointing is not None:
        if checkpointing.get("cpu_checkpointing") is True:
            out.set("model.remat", "offload", "activation_checkpointing.cpu_checkpointing: saved activations in host memory")
        else:
            out.set("model.remat", "full", "activation_checkpointing: recompute each layer, keep its input")
    profiler = ds.get("flops_profiler") or {}
    if profiler.get("enabled") is True:
        step = int(profiler["profile_step"]) if _given(profiler, "profile_step") else 1
        out.set("train.profile_steps", [step, step], "flops_profiler.profile_step: a jax.profiler trace of that step")
    for monitor, key in (("tensorboard", "train.tensorboard_dir"), ("csv_monitor", "train.csv_dir")):
        block = ds.get(monitor) or {}
        if block.get("enabled") is True:
            path = os.path.join(block.get("output_path", ""), block.get("job_name", "DeepSpeedJobName"))
            out.set(key, path, f"{monitor}.output_path/job_name")


def translate(ds: dict, cfg: Config) -> Translation:
    """Everything but the batch sizes; `cfg` (the llmx config with its overrides) gives "auto" values."""
    out = Translation()
    _precision(ds, out)
    _mesh(ds, cfg, out)
    _optimizer(ds, cfg, out)
    _scheduler(ds, cfg, out)
    _training(ds, out)
    return out


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def batch(ds: dict, cfg: Config, out: Translation, *, data_parallel: int, mesh_text: str) -> None:
    """DeepSpeed's batch rule (config.py `_set_batch_related_parameters`, `_batch_assertion`): any two
    of the three fix the third, one alone implies no accumulation, and train_batch_size must equal
    micro batch x accumulation steps x data-parallel size."""
    raw = dict(zip(BATCH_KEYS, (ds.get(k) for k in BATCH_KEYS)))
    llmx_values = dict(zip(BATCH_KEYS, (cfg.train.global_batch_size or None, cfg.train.micro_batch_size,
                                        cfg.train.grad_accum_steps)))
    if all(v is None for v in raw.values()):
        return
    known = {k: llmx_values[k] if v == AUTO else v for k, v in raw.items()}
    from_llmx = {k for k, v in raw.items() if v == AUTO and known[k] is not None}
    if known[BATCH_KEYS[0]] is None and known[BATCH_KEYS[1]] is None:  # accumulation steps alone
        known[BATCH_KEYS[1]] = llmx_values[BATCH_KEYS[1]]
        from_llmx.add(BATCH_KEYS[1])
    total, micro, accum = known.values()
    dp = data_parallel
    if None not in (total, micro, accum):
        pass
    elif total is not None and micro is not None:
        accum = total // micro // dp
    elif total is not None and accum is not None:
        micro = total // dp // accum
    elif micro is not None and accum is not None:
        total = micro * accum * dp
    elif total is not None:
        accum, micro = 1, total // dp
    else:
        total, accum = micro * dp, 1
    total, micro, accum = int(total), int(micro), int(accum)
    if min(total, micro, accum) <= 0 or total != micro * accum * dp:
        raise ConfigError(
            f"ds_config batch sizes do not add up: train_batch_size {total} != train_micro_batch_size_per_gpu "
            f"{micro} x gradient_accumulation_steps {accum} x {dp} data-parallel devices ({mesh_text})"
        )
    for key, value, ds_key in (("train.micro_batch_size", micro, BATCH_KEYS[1]),
                               ("train.grad_accum_steps", accum, BATCH_KEYS[2]),
                               ("train.global_batch_size", total, BATCH_KEYS[0])):
        if ds_key in from_llmx:
            source = f"{ds_key}: the llmx config's value"
        elif raw[ds_key] is not None and raw[ds_key] != AUTO:
            source = ds_key
        else:
            source = f"{ds_key} derived: train_batch_size = micro x accumulation x {dp} data-parallel devices"
        out.set(key, value, source)
