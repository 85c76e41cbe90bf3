"""The run's configuration: a tree of frozen dataclasses, filled from YAML and `section.key=value` overrides.

Strict by design (MaxText's lesson): an unknown key, a wrong type or an out-of-range value raises a
`ConfigError` that names the key and what is allowed. Derived values are properties, never stored.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from llmx import axes, storage
from llmx.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
# The stacked projections LoRA can adapt (llmx.models.layers: Attention and MLP weights).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
DATA_FORMATS = ("text", "prompt_completion", "chat")
# train.precision -> the compute dtype that model.dtype=auto resolves to.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _field(default, *, choices=None, min=None, max=None, help=""):
    """A dataclass field with the validation metadata `_check_value` reads."""
    metadata = {"choices": choices, "min": min, "max": max, "help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The names of llmx.models.FAMILIES (this module cannot import the models, which import it; a test
    # keeps the two equal).
    family: str = _field("llama", choices=("llama", "mixtral"), help="model family (llmx.models): module, FLOPs, HF mapping")
    vocab_size: int = _field(384, min=1, help="embedding rows; at least the tokenizer's vocabulary")
    d_model: int = _field(256, min=1, help="residual width")
    n_layers: int = _field(4, min=1, help="decoder blocks")
    n_heads: int = _field(4, min=1, help="query heads")
    n_kv_heads: int = _field(4, min=1, help="key/value heads (grouped-query attention); divides n_heads")
    d_ff: int = _field(688, min=1, help="SwiGLU hidden width")
    seq_len: int = _field(256, min=2, help="tokens per training sequence")
    rope_theta: float = _field(10000.0, min=1.0, help="RoPE base frequency")
    norm_eps: float = _field(1e-5, min=0.0, help="RMSNorm epsilon")
    tie_embeddings: bool = _field(False, help="reuse the input embedding as the output projection")
    init_std: float = _field(0.02, min=0.0, help="std of the normal init of weight matrices")
    param_dtype: str = _field("float32", choices=DTYPES, help="storage dtype of parameters")
    dtype: str = _field(
        "auto",
        choices=("auto", *DTYPES),
        help="compute dtype of activations and matmuls (auto: from train.precision; matmuls accumulate in fp32)",
    )
    attention: str = _field(
        "auto",
        choices=("auto", "xla", "cudnn", "splash", "triton", "cpu"),
        help="attention kernel: xla einsums, cuDNN flash (GPU), Pallas splash (TPU), Pallas/Triton flash (GPU, "
        "O(T) memory for long packed sequences), llmx's C++ flash kernel (one CPU device, built on first use); "
        "auto picks by backend (cudnn on GPU; on one CPU device cpu where its probe beats xla)",
    )
    scan_layers: str = _field(
        "auto",
        choices=("auto", "true", "false"),
        help="lax.scan over stacked layers (true: compile time flat in depth) or unroll (false); auto: unroll "
        "on one CPU device up to 16 layers without model.remat (the step runs ~1.2x faster there), scan elsewhere",
    )
    remat: str = _field(
        "none",
        choices=("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload"),
        help="activation checkpointing per layer: save nothing (full), every matmul output, the weight "
        "projections' outputs, or those moved to host memory (offload; TPU/GPU, in place on CPU)",
    )
    lora_rank: int = _field(0, min=0, help="LoRA adapters of this rank on model.lora_targets, base weights frozen (0: off)")
    lora_alpha: float = _field(16.0, min=0.0, help="LoRA scale numerator: an adapter adds (lora_alpha / lora_rank) x A B")
    lora_targets: str = _field(
        "wq,wk,wv,wo", help="comma-separated projections that get adapters: wq, wk, wv, wo, w_gate, w_up, w_down, or 'all'"
    )

    n_experts: int = _field(8, min=1, help="mixtral: experts per block (E)")
    experts_per_token: int = _field(2, min=1, help="mixtral: experts each token is routed to (top-k, weights renormalised)")
    moe_d_ff: int = _field(0, min=0, help="mixtral: SwiGLU hidden width of each expert (0: model.d_ff)")
    moe_capacity_factor: float = _field(
        -1.0, help="mixtral: expert capacity = factor x tokens x k / E per device, overflow dropped (-1: dropless)"
    )
    moe_impl: str = _field(
        "auto", choices=("auto", "ragged", "megablox", "dense"),
        help="mixtral experts: ragged (lax.ragged_dot on tokens sorted by expert), megablox (Pallas grouped "
        "matmul; TPU, interpreted elsewhere), dense (capacity dispatch/combine einsums, all-to-all over "
        "mesh.expert); auto: dense with a capacity factor, else megablox on TPU, ragged elsewhere",
    )
    router_aux_loss_coef: float = _field(0.01, min=0.0, help="mixtral: weight of the load-balancing loss (Switch / Mixtral)")
    router_z_loss_coef: float = _field(0.0, min=0.0, help="mixtral: weight of the router z-loss (ST-MoE)")

    quantization: str = _field(
        "none",
        choices=("none", "int8", "fp8"),
        help="quantization-aware training of the projections: int8 (weights and activations fake-quantised, "
        "straight-through gradients) or fp8 (e4m3 forward, e5m2 gradients, current scaling); master "
        "weights stay param_dtype",
    )
    weight_format: str = _field(
        "float",
        choices=("float", "int8", "int4", "fp8"),
        help="how matmul weights are stored: float (param_dtype) or quantized by llmx.quantize "
        "(a scale per output channel; not trainable)",
    )
    weight_group: int = _field(
        0, min=0, help="quantized weights: weights per scale along the contracted axis (0: per output channel)"
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                f"use a divisor of {self.d_model}"
            )
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head dimension d_model/n_heads={self.head_dim} must be even for rotary embeddings"
            )
        if self.family == "mixtral":
            self._validate_moe()
        if self.lora_rank:
            unknown = [t for t in self.lora_target_names if t not in LORA_TARGETS]
            if unknown or not self.lora_target_names:
                raise ConfigError(
                    f"model.lora_targets={self.lora_targets!r}: {', '.join(map(repr, unknown)) or 'no projection'} "
                    f"is not a projection of the model; choose from {', '.join(LORA_TARGETS)} or 'all'"
                )

    @property
    def expert_d_ff(self) -> int:
        """The SwiGLU hidden width of each expert (model.moe_d_ff, or model.d_ff when 0)."""
        return self.moe_d_ff or self.d_ff

    def _validate_moe(self) -> None:
        if self.experts_per_token > self.n_experts:
            raise ConfigError(
                f"model.experts_per_token={self.experts_per_token} exceeds model.n_experts={self.n_experts}; "
                f"route each token to at most {self.n_experts} experts"
            )
        if self.moe_capacity_factor != -1 and self.moe_capacity_factor <= 0:
            raise ConfigError(
                f"model.moe_capacity_factor={self.moe_capacity_factor} must be > 0, or -1 for dropless routing"
            )
        for key, value, off in (("quantization", self.quantization, "none"), ("weight_format", self.weight_format, "float")):
            if value != off:
                raise ConfigError(f"model.{key}={value} is not implemented for model.family=mixtral; set model.{key}={off}")
        if self.lora_rank:
            raise ConfigError("model.lora_rank > 0 is not implemented for model.family=mixtral; set model.lora_rank=0")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """The projections named by lora_targets ('all': every one), in LORA_TARGETS order when known."""
        names = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        return LORA_TARGETS if names == ["all"] else tuple(names)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = _field(
        "stdlib",
        help="'stdlib' (the interpreter's standard library), a directory or glob of .txt/.py/.md/.jsonl files, "
        "'tfds:NAME', or a mixture 'A@3,B@1'",
    )
    tokenizer: str = _field("byte", help="'byte', 'bpe' (trained on the corpus), or a path to a tokenizer.json")
    bpe_vocab_size: int = _field(0, min=0, help="ids of a trained BPE tokenizer (0: model.vocab_size)")
    bos_token: str = _field("<s>", help="BOS token of a loaded tokenizer.json")
    eos_token: str = _field("</s>", help="EOS token of a loaded tokenizer.json")
    pad_token: str = _field("<pad>", help="PAD token of a loaded tokenizer.json (falls back to EOS)")
    text_field: str = _field("text", help="the text field of .jsonl lines and TFDS records")
    cache_dir: str = _field("", help="where prepared datasets live; '' means $LLMX_DATA_DIR or ~/.cache/llmx/data")
    tfds_data_dir: str = _field("", help="data_dir of prepared TFDS datasets ('' : TFDS's default)")
    eval_split: str = _field("validation", help="the held-out split of a tfds: source")
    eval_sources: str = _field("", help="extra evaluation sets, 'NAME=SOURCE,NAME=SOURCE' (every document of each)")
    validation_percent: float = _field(
        2.0, min=0.0, max=50.0, help="share of documents (by content hash) held out for validation"
    )
    min_chars: int = _field(0, min=0, help="drop documents shorter than this")
    dedup: bool = _field(False, help="drop exact duplicate documents")
    max_documents: int = _field(0, min=0, help="use at most this many files per source (0: all)")
    prefetch: int = _field(8, min=0, help="batches prepared ahead by a background thread (0: in the training loop)")
    format: str = _field(
        "text", choices=DATA_FORMATS,
        help="text: documents; prompt_completion / chat: supervised .jsonl records, loss on completions and "
        "assistant turns (and their EOS) only",
    )
    prompt_field: str = _field("prompt", help="data.format=prompt_completion: the prompt field of each .jsonl line")
    completion_field: str = _field("completion", help="data.format=prompt_completion: the completion field")
    messages_field: str = _field("messages", help="data.format=chat: the field holding [{role, content}, ...]")
    chat_template: str = _field(
        "", help="data.format=chat: a Jinja chat template (a file or the text) marking assistant spans with "
        "{% generation %}...{% endgeneration %} ('': the tokenizer's tokenizer_config.json, else llmx's default)"
    )
    train_on_prompt: bool = _field(False, help="supervised formats: put loss on prompt and user/system tokens too")
    folds: int = _field(0, min=0, help="supervised formats: k-fold cross-validation by content hash (0: off; "
                        "data.validation_percent then splits)")
    fold: int = _field(0, min=0, help="with data.folds=k: the fold held out for validation, 0 .. k-1")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = _field("adamw", choices=("adamw", "sgd", "lamb"), help="optimizer")
    impl: str = _field(
        "optax", choices=("optax", "pallas"),
        help="optax (XLA-fused) or the fused Pallas kernels (on CPU their jnp reference: Pallas only interprets there)",
    )
    lr: float = _field(3e-3, min=0.0, help="peak learning rate")
    schedule: str = _field(
        "cosine",
        choices=("constant", "linear", "cosine", "step", "one_cycle", "warmup_lr", "warmup_decay_lr",
                 "warmup_cosine_lr", "one_cycle_linear"),
        help="learning-rate schedule; the last four are DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle",
    )
    warmup_steps: int = _field(0, min=0, help="linear warmup from 0 to optim.lr")
    decay_steps: int = _field(0, min=0, help="steps of decay after warmup (0: until train.steps)")
    min_lr_ratio: float = _field(0.1, min=0.0, max=1.0, help="final lr / peak lr for linear and cosine")
    warmup_type: str = _field(
        "linear", choices=("linear", "log"), help="warmup shape of warmup_lr, warmup_decay_lr, warmup_cosine_lr"
    )
    warmup_min_lr: float = _field(
        0.0, min=0.0, help="lr at the start of the DeepSpeed schedules' warmup (one_cycle_linear: the cycle's low end)"
    )
    schedule_steps: int = _field(
        0, min=0, help="warmup_decay_lr, warmup_cosine_lr: total steps, warmup included (0: train.steps)"
    )
    cycle_down_steps: int = _field(
        -1, min=-1, help="one_cycle_linear: steps from optim.lr back to warmup_min_lr (-1: warmup_steps)"
    )
    cycle_up_stairs: int = _field(0, min=0, help="one_cycle_linear: rise in this many stairs (0: continuously)")
    cycle_down_stairs: int = _field(-1, min=-1, help="one_cycle_linear: fall in this many stairs (-1: cycle_up_stairs)")
    cycle_decay_every: int = _field(
        0, min=0, help="one_cycle_linear after the cycle: lr = warmup_min_lr / (1 + cycle_decay_rate x t / this) (0: flat)"
    )
    cycle_decay_rate: float = _field(0.0, min=0.0, help="one_cycle_linear: decay rate after the cycle")
    step_every: int = _field(1000, min=1, help="'step' schedule: multiply lr by step_gamma every this many steps")
    step_gamma: float = _field(0.1, min=0.0, help="'step' schedule decay factor")
    weight_decay: float = _field(0.0, min=0.0, help="decoupled weight decay")
    decay_norms_and_biases: bool = _field(False, help="also apply weight decay to norm scales and biases")
    grad_clip: float = _field(1.0, min=0.0, help="global-norm gradient clipping (0: off)")
    b1: float = _field(0.9, min=0.0, max=1.0, help="Adam/LAMB beta1")
    b2: float = _field(0.95, min=0.0, max=1.0, help="Adam/LAMB beta2")
    eps: float = _field(1e-8, min=0.0, help="Adam/LAMB epsilon")
    momentum: float = _field(0.9, min=0.0, max=1.0, help="SGD momentum")
    nesterov: bool = _field(False, help="SGD Nesterov momentum")
    prune_method: str = _field(
        "none", choices=("none", "magnitude", "n_m"),
        help="prune the layers' projections: gradual magnitude pruning (cubic schedule) or N:M structured "
        "(2:4); masks live in the optimizer state",
    )
    prune_sparsity: float = _field(0.5, min=0.0, max=0.99, help="magnitude: the final fraction of zeros per layer")
    prune_begin_step: int = _field(0, min=0, help="pruning starts (sparsity 0) at this step")
    prune_end_step: int = _field(0, min=0, help="magnitude reaches prune_sparsity here; N:M masks freeze here")
    prune_every: int = _field(10, min=1, help="steps between mask updates from begin to end")
    prune_n: int = _field(2, min=1, help="n_m: weights kept of every prune_m along the contracted axis")
    prune_m: int = _field(4, min=2, help="n_m: group size along the contracted axis")

    def validate(self) -> None:
        if self.prune_method != "none" and self.prune_end_step < self.prune_begin_step:
            raise ConfigError(
                f"optim.prune_end_step={self.prune_end_step} is before optim.prune_begin_step="
                f"{self.prune_begin_step}; set optim.prune_end_step >= optim.prune_begin_step"
            )
        if self.prune_method == "n_m" and self.prune_n >= self.prune_m:
            raise ConfigError(f"optim.prune_n={self.prune_n} must be less than optim.prune_m={self.prune_m}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    pipeline: int = _field(1, min=-1, help="pipeline stages: the layer stack split over devices, micro-batches streamed through")
    data: int = _field(-1, min=-1, help="pure data-parallel replicas (-1: the devices left over)")
    fsdp: int = _field(1, min=-1, help="ZeRO/FSDP group size: batch is split over it too (-1: fill)")
    expert: int = _field(
        1, min=-1, help="expert-parallel group: model.n_experts split over it, tokens exchanged by all-to-all; "
        "the batch is split over it too (-1: fill)"
    )
    sequence: int = _field(
        1, min=-1, help="sequence (context) parallel group: every sequence is split over it, weights too by ZeRO (-1: fill)"
    )
    sequence_strategy: str = _field(
        "auto",
        choices=("auto", "all_gather", "ulysses", "ring"),
        help="attention with mesh.sequence > 1: K/V all-gathered, DeepSpeed-Ulysses all-to-alls (heads over "
        "tensor x sequence), or a ring of K/V blocks; auto: ulysses around a fused kernel (splash, cudnn, triton), else ring",
    )
    sequence_load_balance: bool = _field(
        True,
        help="causal load balance (all_gather, ring): device i holds chunks i and 2S-1-i of each sequence, "
        "reordered on the host; ulysses is balanced by construction",
    )
    tensor: int = _field(1, min=-1, help="tensor-parallel (Megatron) group size (-1: fill)")
    zero_stage: int = _field(0, choices=(0, 1, 2, 3), help="what is sharded over fsdp (and sequence): 1 opt state, 2 +grads, 3 +params")
    offload_optimizer: bool = _field(
        False, help="keep the optimizer state in pinned host memory between steps (GPU/TPU; a no-op on CPU)"
    )
    pipeline_repeats: int = _field(
        1, min=1, help="circular pipeline: each stage holds this many non-contiguous slices of the layers (bubble / R)"
    )
    pipeline_gather_weights_once: bool = _field(
        True, help="zero_stage 3 with pipeline > 1: gather a stage's weights once per step, not once per micro-batch"
    )

    def validate(self) -> None:
        sizes = axes.configured_sizes(self)
        for name, size in sizes.items():
            if size == 0:
                raise ConfigError(f"mesh.{name}=0 is not a size; use a positive integer or -1 to fill")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ConfigError("at most one of " + ", ".join(f"mesh.{name}" for name in sizes) + " may be -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = _field(500, min=0, help="optimizer steps to train for (total, across resumes)")
    seed: int = _field(0, min=0, help="seeds init, data order and sampling")
    run_dir: str = _field("runs/tiny", help="checkpoints, metrics.jsonl, TensorBoard events, config.yaml; a local "
                          "directory or gs://bucket/path (the gcs extra; see Cloud storage)")
    micro_batch_size: int = _field(8, min=1, help="sequences per data-parallel replica per micro-step")
    grad_accum_steps: int = _field(1, min=1, help="micro-batches accumulated into one optimizer step")
    global_batch_size: int = _field(
        0, min=0, help="if set, must equal micro_batch_size x grad_accum_steps x (mesh.data x mesh.fsdp x mesh.expert)"
    )
    log_every: int = _field(10, min=1, help="steps between metric lines")
    eval_every: int = _field(100, min=0, help="steps between validation passes (0: only at the end)")
    eval_batches: int = _field(8, min=1, help="validation batches per evaluation")
    sample_tokens: int = _field(200, min=0, help="tokens of the sample generated at the end (0: none)")
    sample_prompt: str = _field("def ", help="prompt of the end-of-run sample")
    progress: bool = _field(True, help="show a progress bar")
    plot: bool = _field(False, help="write metrics.png (loss, eval loss, lr, tokens/s, MFU) at the end")
    profile_steps: tuple = _field((), help="[start, end]: write a jax.profiler trace of these steps to run_dir/profile "
                                  "(a local run_dir)")
    compilation_cache_dir: str = _field(
        "~/.cache/llmx/jax", help="JAX persistent compilation cache ('' disables)"
    )
    wait_for_lock: float = _field(
        0.0, min=0.0, help="seconds to wait for another trainer to release train.run_dir (0: exit at once, naming it)"
    )
    skip_fit_check: bool = _field(
        False, help="start even if the step's memory need (llmx.plan) exceeds what the devices have available"
    )
    on_nan: str = _field(
        "skip",
        choices=("skip", "stop"),
        help="non-finite loss or gradient norm: skip the update (counted in skipped_steps) or stop with an error",
    )
    precision: str = _field(
        "fp32",
        choices=tuple(PRECISION_DTYPES),
        help="fp32 master weights with fp32, bf16 or fp16 compute (fp16: dynamic loss scaling)",
    )
    tensorboard_dir: str = _field("", help="TensorBoard event files ('': run_dir/tensorboard); local or gs://")
    csv_dir: str = _field("", help="also write one step,value CSV file per metric here (DeepSpeed's csv_monitor; '': off)")
    loss_scale: float = _field(0.0, min=0.0, help="fp16: a static loss scale (0: dynamic scaling)")
    initial_scale_power: int = _field(16, min=0, max=64, help="fp16 dynamic scaling starts at 2**this")
    loss_scale_window: int = _field(1000, min=1, help="fp16: steps without overflow before the scale doubles")
    hysteresis: int = _field(2, min=1, help="fp16: overflows tolerated before the scale is halved")
    min_loss_scale: float = _field(1.0, min=0.0, help="fp16: the dynamic scale never drops below this")
    eval_tasks: str = _field(
        "", help="lm-evaluation-harness tasks run periodically, 'NAME,NAME' (needs the eval extra; '': none)"
    )
    eval_tasks_every: int = _field(0, min=0, help="steps between task evaluations (0: train.eval_every); also at the end")
    eval_tasks_include: str = _field("", help="a directory of extra task YAMLs (besides configs/tasks)")
    eval_tasks_limit: int = _field(0, min=0, help="items per task (0: all)")
    wandb_project: str = _field("", help="log metrics and the config to this Weights & Biases project ('': off; the wandb extra)")
    wandb_entity: str = _field("", help="W&B entity (team or user; '': your default)")
    wandb_run_name: str = _field("", help="W&B run name ('': W&B picks one); a rerun resumes the same run")
    wandb_tags: str = _field("", help="W&B tags of the run, comma-separated")
    stop_check_every: int = _field(
        10, min=1, help="several processes: steps between the all-reduce that turns a stop signal on any process "
        "into a stop of all of them after the same step (1: every step; each check waits for the step)"
    )
    peak_flops_per_device: float = _field(
        0.0, min=0.0, help="bf16 peak FLOP/s of one device for MFU (0: llmx.flops's data-sheet table or the CPU probe)"
    )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = _field(100, min=0, help="steps between checkpoints (0: only at the end)")
    keep: int = _field(3, min=1, help="newest checkpoints kept")
    async_save: bool = _field(True, help="write checkpoints in a background thread")
    keep_every: int = _field(0, min=0, help="also keep every checkpoint whose step is a multiple of this (0: off)")
    restore_from: str = _field(
        "",
        help="start a run that has no checkpoint of its own from this one: a step directory, a checkpoints "
        "directory (its newest step) or a run directory; local or gs://",
    )
    restore_mode: str = _field(
        "full",
        choices=("full", "weights"),
        help="full: state, optimizer and data position; weights: parameters only, at step 0",
    )
    adapters_only: bool = _field(
        False, help="with model.lora_rank: checkpoints hold the adapters and optimizer state, not the frozen base "
        "(read from checkpoint.restore_from)"
    )
    on_corrupt: str = _field(
        "fallback",
        choices=("fallback", "stop"),
        help="an unreadable checkpoint on resume: move it to checkpoints/corrupt/<step> and resume from the newest "
        "one that reads completely (fallback), or stop with an error (stop)",
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        self.model.validate()
        self.optim.validate()
        self.mesh.validate()
        d = self.data
        if d.folds and d.fold >= d.folds:
            raise ConfigError(f"data.fold={d.fold} with data.folds={d.folds}: choose a fold from 0 to {d.folds - 1}")
        if d.folds == 1:
            raise ConfigError("data.folds=1 holds out everything; use 0 (off) or at least 2")
        if d.folds and d.format == "text":
            raise ConfigError("data.folds needs a supervised data.format (prompt_completion or chat)")
        if self.checkpoint.adapters_only and not (self.model.lora_rank and self.checkpoint.restore_from):
            raise ConfigError(
                "checkpoint.adapters_only=true needs model.lora_rank > 0 and checkpoint.restore_from (the frozen base)"
            )
        if self.model.family == "mixtral":
            self._check_moe_mesh()
        if self.mesh.pipeline != -1:  # -1 is checked once the mesh is built (llmx.step.build_steps)
            self.check_pipeline(self.mesh.pipeline)

    def _check_moe_mesh(self) -> None:
        """What a mixture of experts needs of the mesh and the rest of the run (-1 sizes: `llmx.models.moe`)."""
        m, expert = self.model, self.mesh.expert
        if expert > 0 and m.n_experts % expert:
            raise ConfigError(
                f"model.n_experts={m.n_experts} is not divisible by mesh.expert={expert}; use a divisor of {m.n_experts}"
            )
        for axis in ("pipeline", "sequence"):
            if getattr(self.mesh, axis) not in (1,):
                raise ConfigError(f"mesh.{axis}={getattr(self.mesh, axis)} is not implemented for model.family=mixtral; set mesh.{axis}=1")
        if self.optim.prune_method != "none":
            raise ConfigError("optim.prune_method is not implemented for model.family=mixtral; set optim.prune_method=none")

    def check_pipeline(self, stages: int) -> None:
        """The pipeline's arithmetic for `stages` stages (llmx.pipeline): the layers split evenly into
        stages x repeats slices, and at least one micro-batch per stage (GPipe; the circular schedule
        needs it so the last stage's output is back at the first stage before it is needed)."""
        repeats, layers, micro = self.mesh.pipeline_repeats, self.model.n_layers, self.train.grad_accum_steps
        if stages == 1:
            if repeats > 1:
                raise ConfigError(f"mesh.pipeline_repeats={repeats} needs mesh.pipeline > 1; set it to 1")
            return
        if layers % (stages * repeats):
            raise ConfigError(
                f"model.n_layers={layers} is not divisible by mesh.pipeline {stages} x mesh.pipeline_repeats "
                f"{repeats} = {stages * repeats}; use a multiple of {stages * repeats} layers or fewer stages/repeats"
            )
        if micro < stages:
            raise ConfigError(
                f"train.grad_accum_steps={micro} is smaller than mesh.pipeline={stages}: the pipeline streams "
                f"grad_accum_steps micro-batches through {stages} stages; set train.grad_accum_steps >= {stages}"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections_overrides: dict[str, Any]) -> Config:
        """A new config with `section={key: value}` overrides applied and checked."""
        raw = self.to_dict()
        for section, values in sections_overrides.items():
            raw.setdefault(section, {}).update(values)
        return from_dict(raw)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(section: str, field: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{field.name}"
    tp = typing.get_type_hints(SECTIONS[section])[field.name]
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if tp is tuple:  # a pair of step numbers, [start, end]
        if not (isinstance(value, (list, tuple)) and (len(value) == 0 or (
                len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
                and value[0] <= value[1]))):
            raise ConfigError(f"{key}={value!r} must be [start, end] with 1 <= start <= end, or [] for none")
        return tuple(value)
    if tp is str and isinstance(value, bool) and {"true", "false"} <= set(field.metadata.get("choices") or ()):
        value = str(value).lower()  # a tri-state key (auto/true/false) read from YAML's boolean
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    value = tp(value)
    meta = field.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {allowed}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}={value!r} is out of range; must be >= {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}={value!r} is out of range; must be <= {meta['max']}")
    return value


def _build_section(section: str, values: Any):
    cls = SECTIONS[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{section}.{name}'; {section} keys are: {allowed}")
        kwargs[name] = _check_value(section, fields[name], value)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping with sections " + ", ".join(SECTIONS))
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'; sections are: {', '.join(SECTIONS)}")
    cfg = _resolve_precision(Config(**{s: _build_section(s, raw.get(s)) for s in SECTIONS}))
    cfg.validate()
    return cfg


def _resolve_precision(cfg: Config) -> Config:
    """model.dtype=auto becomes the compute dtype of train.precision; an explicit model.dtype wins,
    except for pairs that cannot work: fp16 compute needs loss scaling, and loss scaling is for fp16."""
    precision, dtype = cfg.train.precision, cfg.model.dtype
    if dtype == "auto":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=PRECISION_DTYPES[precision]))
    if dtype == "float16" and precision != "fp16":
        raise ConfigError(
            f"model.dtype=float16 with train.precision={precision}: fp16 gradients underflow without loss "
            "scaling; set train.precision=fp16 (and model.dtype=auto)"
        )
    if precision == "fp16" and dtype != "float16":
        raise ConfigError(
            f"train.precision=fp16 computes in float16 but model.dtype={dtype}; set model.dtype=auto or float16"
        )
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.steps=100)")
    path, raw_value = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError:
        value = raw_value
    return section, key, value


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A config file's sections ({} for no file); a missing or malformed file is one ConfigError line."""
    if path is None:
        return {}
    path = storage.path(path)  # a run's config.yaml may be in a bucket
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return raw


def load(path: str | Path | None = None, overrides: list[str] = (), *, base: dict[str, dict] | None = None) -> Config:
    """The config from a YAML file (or the defaults) with `section.key=value` overrides applied.

    `base` ({section: {key: value}}, e.g. a translated ds_config) goes between the file and the overrides."""
    raw = read_yaml(path)
    for section, values in (base or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in '{text}'; sections are: {', '.join(SECTIONS)}")
        section_values = raw.setdefault(section, {}) or {}
        raw[section] = section_values
        section_values[key] = value
    return from_dict(raw)


def reference_markdown() -> str:
    """The config reference table of the README (a test keeps the two equal)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("choices") is not None:
                allowed = " \\| ".join(str(c) for c in meta["choices"])
            else:
                bounds = [f">= {meta['min']}" if meta.get("min") is not None else "",
                          f"<= {meta['max']}" if meta.get("max") is not None else ""]
                allowed = ", ".join(b for b in bounds if b)
            rows.append(f"| `{section}.{f.name}` | `{f.default!r}` | {allowed} | {meta.get('help', '')} |")
    return "\n".join(rows)
