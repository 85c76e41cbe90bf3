"""ds_config.json files run as they are: real-world configs convert, train and warn exactly; the key
mapping, DeepSpeed's batch rule, "auto" and the precedence llmx config < ds_config < command line;
bad input is one line and exit status 2."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PYTHON, REPO
from helpers import read_metrics
from llmx import config as config_lib
from llmx import deepspeed, distributed, launch, optim
from llmx.config.__main__ import main as config_main
from llmx.deepspeed import DeepSpeedConfig
from llmx.errors import ConfigError
from llmx.mesh import mesh_shape
from llmx.train import train

DATA = REPO / "tests" / "data" / "deepspeed"

# The llmx side of every run: tests/helpers.py's SMALL model, as a YAML file (the ds_config must be able to
# override its optimizer, schedule and batch, which command-line overrides would not let it).
MODEL_YAML = {
    "model": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=32),
    "data": dict(max_documents=80, validation_percent=20),
    "optim": dict(warmup_steps=2),
    "train": dict(steps=3, log_every=1, eval_every=0, eval_batches=2, sample_tokens=0, progress=False,
                  micro_batch_size=2),
}


@pytest.fixture
def model_yaml(tmp_path, data_dir) -> Path:
    raw = {**MODEL_YAML, "data": {**MODEL_YAML["data"], "cache_dir": str(data_dir)},
           "train": {**MODEL_YAML["train"], "run_dir": str(tmp_path / "run")}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ignored_warning(*keys: str) -> list[str]:
    return [f"ds_config keys with no llmx analogue, ignored ({deepspeed.WHY_IGNORED}): {', '.join(keys)}"]


ZERO_BUCKETS = ("zero_optimization.overlap_comm", "zero_optimization.contiguous_gradients")
# name -> (expected llmx values, expected warnings). Every config trains 3 steps on the 8-device mesh.
REAL_WORLD = {
    "hf_zero2_auto": (
        {"mesh.zero_stage": 2, "mesh.fsdp": -1, "mesh.data": 1, "mesh.offload_optimizer": True,
         "optim.name": "adamw", "optim.schedule": "warmup_lr", "optim.warmup_type": "log", "optim.lr": 0.003,
         "optim.warmup_steps": 2, "optim.b2": 0.95, "train.precision": "fp32", "train.micro_batch_size": 2,
         "train.grad_accum_steps": 1, "train.global_batch_size": 16, "train.log_every": 2000},
        ignored_warning("zero_optimization.offload_optimizer.pin_memory", "zero_optimization.allgather_partitions",
                        "zero_optimization.allgather_bucket_size", "zero_optimization.overlap_comm",
                        "zero_optimization.reduce_scatter", "zero_optimization.reduce_bucket_size",
                        "zero_optimization.contiguous_gradients", "wall_clock_breakdown"),
    ),
    "hf_zero3_bf16_warmupdecay": (
        {"mesh.zero_stage": 3, "mesh.fsdp": -1, "train.precision": "bf16", "model.dtype": "bfloat16",
         "optim.schedule": "warmup_decay_lr", "optim.schedule_steps": 0, "optim.b1": 0.9, "optim.b2": 0.999,
         "optim.grad_clip": 1.0, "train.global_batch_size": 16},
        ignored_warning(*ZERO_BUCKETS, "zero_optimization.reduce_bucket_size",
                        "zero_optimization.stage3_prefetch_bucket_size",
                        "zero_optimization.stage3_param_persistence_threshold", "zero_optimization.sub_group_size",
                        "zero_optimization.stage3_max_live_parameters", "zero_optimization.stage3_max_reuse_distance",
                        "zero_optimization.stage3_gather_16bit_weights_on_model_save", "wall_clock_breakdown"),
    ),
    "dse_megatron_zero2_fp16": (
        {"mesh.zero_stage": 2, "train.precision": "fp16", "model.dtype": "float16", "optim.lr": 0.00015,
         "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.b2": 0.999, "model.remat": "full",
         "train.micro_batch_size": 2, "train.grad_accum_steps": 1, "train.global_batch_size": 16,
         "train.loss_scale_window": 1000, "train.hysteresis": 2},
        ignored_warning("activation_checkpointing.contiguous_memory_optimization", "wall_clock_breakdown"),
    ),
    "dse_autotuning_fp16_z1": (
        {"mesh.zero_stage": 1, "mesh.fsdp": -1, "train.precision": "fp16", "train.micro_batch_size": 2,
         "train.global_batch_size": 16, "optim.schedule": "cosine"},
        [],
    ),
    "zero2_warmupcosine_bf16": (
        {"optim.schedule": "warmup_cosine_lr", "optim.warmup_type": "linear", "optim.min_lr_ratio": 0.1,
         "optim.warmup_min_lr": 0.0, "optim.schedule_steps": 3, "optim.weight_decay": 0.1, "optim.b2": 0.95,
         "train.precision": "bf16", "train.micro_batch_size": 1, "train.grad_accum_steps": 2,
         "train.global_batch_size": 16},
        ignored_warning(*ZERO_BUCKETS, "zero_optimization.allgather_bucket_size",
                        "zero_optimization.reduce_bucket_size", "wall_clock_breakdown"),
    ),
    "onecycle_sgd_hpz_monitors": (
        {"mesh.zero_stage": 3, "mesh.fsdp": 4, "mesh.data": -1, "optim.name": "sgd", "optim.nesterov": True,
         "optim.momentum": 0.9, "optim.schedule": "one_cycle_linear", "optim.lr": 0.015, "optim.warmup_min_lr": 0.004,
         "optim.warmup_steps": 2, "optim.cycle_down_steps": 1, "optim.cycle_decay_every": 1,
         "train.micro_batch_size": 2, "train.grad_accum_steps": 2, "train.global_batch_size": 32,
         "train.profile_steps": (2, 2), "train.tensorboard_dir": "logs/ds_tensorboard_logs/step1_tensorboard",
         "train.csv_dir": "logs/csv/qanet"},
        ignored_warning("zero_optimization.reduce_scatter", "zero_optimization.contiguous_gradients",
                        "zero_optimization.overlap_comm", "flops_profiler.module_depth", "flops_profiler.top_modules",
                        "flops_profiler.detailed", "flops_profiler.output_file"),
    ),
    "lamb_zero1": (
        {"optim.name": "lamb", "optim.lr": 0.005, "optim.weight_decay": 0.01, "mesh.zero_stage": 1,
         "train.precision": "fp32", "train.micro_batch_size": 2},
        ignored_warning("prescale_gradients", "wall_clock_breakdown"),
    ),
}


def _value(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("name", REAL_WORLD)
@pytest.mark.slow
def test_real_world_config_converts_trains_and_warns_exactly(name, model_yaml, tmp_path, monkeypatch, capsys):
    expected, warnings = REAL_WORLD[name]
    monkeypatch.chdir(tmp_path)  # monitors write to paths relative to the working directory, as in DeepSpeed
    ds_path = DATA / f"{name}.json"
    # The command-line conversion: the YAML on stdout, exactly the expected warnings on stderr.
    assert config_main(["from-deepspeed", str(ds_path), "--config", str(model_yaml), "--devices", "8"]) == 0
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [f"warning: {w}" for w in warnings]
    cfg, _ = deepspeed.load(str(model_yaml), deepspeed.read(ds_path), n_devices=8)
    assert config_lib.from_dict(yaml.safe_load(printed.out)) == cfg
    for key, value in expected.items():
        assert _value(cfg, key) == value, key

    summary = train(cfg)
    losses = [summary.losses[s] for s in (1, 2, 3)]
    assert np.all(np.isfinite(losses)) and summary.skipped_steps < 3, (losses, summary.skipped_steps)
    lrs = [m["lr"] for m in read_metrics(cfg.train.run_dir) if "lr" in m]
    np.testing.assert_allclose(lrs, [float(optim.schedule(cfg.optim, 3)(s)) for s in range(3)], rtol=1e-6)
    if cfg.train.csv_dir:  # DeepSpeed's csv_monitor layout: <dir>/<metric>.csv, header step,<metric>
        rows = list(csv.reader(open(Path(cfg.train.csv_dir) / "loss.csv")))
        assert rows[0] == ["step", "loss"] and [int(r[0]) for r in rows[1:]] == [1, 2, 3]
        assert list(Path(cfg.train.tensorboard_dir).glob("events.out.tfevents.*"))
        assert (Path(cfg.train.run_dir) / "profile").is_dir()


def translated(ds_values: dict, *overrides: str, n_devices: int = 8, config_path=None):
    return deepspeed.load(config_path, DeepSpeedConfig("ds.json", ds_values, ()), list(overrides),
                          n_devices=n_devices)[0]


@pytest.mark.parametrize("ds_values, micro, accum, total", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, 2, 4, 64),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, 2, 64),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, 3, 48),
    ({"train_batch_size": 16}, 2, 1, 16),
    ({"train_micro_batch_size_per_gpu": 4}, 4, 1, 32),
    ({"gradient_accumulation_steps": 2}, 8, 2, 128),  # the micro batch is the llmx config's (default 8)
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 2, 2, 32),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"},
     8, 1, 64),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2}}, 2, 2, 16),
])
def test_batch_rule_any_two_fix_the_third(ds_values, micro, accum, total):
    cfg = translated(ds_values)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.global_batch_size) == (micro, accum, total)


@pytest.mark.parametrize("ds_values, message", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
     "train_batch_size 10 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 0 x 8 data-parallel "
     "devices (mesh.data 8 x mesh.fsdp 1 on 8 devices)"),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     "train_batch_size 64 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x 8"),
    ({"train_batch_size": 4}, "train_batch_size 4 != train_micro_batch_size_per_gpu 0"),
])
def test_batch_that_does_not_add_up_is_an_error(ds_values, message):
    with pytest.raises(ConfigError, match="ds_config batch sizes do not add up") as e:
        translated(ds_values)
    assert message in str(e.value)


def test_precedence_llmx_config_then_ds_config_then_command_line(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.1, "weight_decay": 0.2}, "train": {"precision": "bf16"}}))
    ds_values = {"optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": "auto"}},
                 "fp16": {"enabled": "auto"}}
    cfg = translated(ds_values, config_path=str(path))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.precision) == (0.01, 0.2, "bf16")  # "auto": llmx's
    cfg = translated(ds_values, "optim.lr=0.5", config_path=str(path))
    assert cfg.optim.lr == 0.5
    assert translated({}, config_path=str(path)).train.precision == "fp32"  # no fp16/bf16 section: DeepSpeed's fp32


def test_mapping_of_mesh_precision_optimizer_and_checkpointing():
    hpz = translated({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}})
    assert mesh_shape(hpz.mesh, 8) == {"pipeline": 1, "data": 2, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1}
    assert hpz.mesh.zero_stage == 3
    mics = translated({"zero_optimization": {"stage": 3, "mics_shard_size": 2}})
    assert mesh_shape(mics.mesh, 8) == {"pipeline": 1, "data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    plain = translated({"zero_optimization": {"stage": 0}}, "mesh.fsdp=8")  # the command line still wins
    assert (plain.mesh.zero_stage, plain.mesh.fsdp) == (0, 8)
    assert translated({}).mesh.zero_stage == 0 and mesh_shape(translated({}).mesh, 8)["data"] == 8
    tp = translated({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}})
    assert mesh_shape(tp.mesh, 8) == {"pipeline": 1, "data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}
    ulysses = translated({"zero_optimization": {"stage": 3}, "sequence_parallel_size": 4, "train_batch_size": 4},
                         "model.seq_len=64")
    assert mesh_shape(ulysses.mesh, 8) == {"pipeline": 1, "data": 1, "fsdp": 2, "expert": 1, "sequence": 4, "tensor": 1}
    assert (ulysses.mesh.sequence_strategy, ulysses.train.micro_batch_size) == ("ulysses", 2)  # 2 data-parallel ranks
    assert translated({"zero_optimization": {"stage": 2, "cpu_offload": True}}).mesh.offload_optimizer
    static = translated({"fp16": {"enabled": True, "loss_scale": 128, "initial_scale_power": 12,
                                  "loss_scale_window": 500.0, "min_loss_scale": 0.5}})
    assert (static.train.precision, static.model.dtype, static.train.loss_scale, static.train.initial_scale_power,
            static.train.loss_scale_window, static.train.min_loss_scale) == ("fp16", "float16", 128.0, 12, 500, 0.5)
    sgd = translated({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}})  # torch.optim.SGD's defaults
    assert (sgd.optim.name, sgd.optim.momentum, sgd.optim.nesterov, sgd.optim.schedule) == ("sgd", 0.0, False, "constant")
    torch_adamw = translated({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert (torch_adamw.optim.weight_decay, torch_adamw.optim.lr, torch_adamw.optim.b2) == (0.01, 1e-3, 0.999)
    l2_free = translated({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}})
    assert l2_free.optim.name == "adamw" and l2_free.optim.weight_decay == 0.0
    assert translated({"activation_checkpointing": {"cpu_checkpointing": True}}).model.remat == "offload"
    assert translated({"gradient_clipping": 0.0}).optim.grad_clip == 0.0
    assert translated({}).optim.grad_clip == 1.0  # DeepSpeed's default
    assert translated({"steps_per_print": 7}).train.log_every == 7


@pytest.mark.parametrize("ds_values, message", [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both fp16 and bf16"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.01}}},
     "optimizer.params.adam_w_mode=false with weight_decay 0.01"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0}}},
     "scheduler.params.cycle_momentum"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1.0}}}, "OneCycle needs scheduler.params.cycle_min_lr"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "WarmupDecayLR needs scheduler.params.total_num_steps"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}}, "warmup_num_steps to be a positive integer"),
    ({"zero_optimization": {"zero_hpz_partition_size": 2, "mics_shard_size": 4}}, "give one group size"),
])
def test_translation_errors(ds_values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        translated(ds_values)


def write(tmp_path, values, name="ds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(values) if not isinstance(values, str) else values)
    return path


@pytest.mark.parametrize("ds_values, message", [
    ({"train_batch_szie": 8}, "unknown DeepSpeed config key 'train_batch_szie'; did you mean 'train_batch_size'?"),
    ({"zero_optimization": {"offload_optimzer": {}}},
     "'zero_optimization.offload_optimzer'; did you mean 'zero_optimization.offload_optimizer'?"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
     "'optimizer.params.weight_decy'; did you mean 'optimizer.params.weight_decay'?"),
    ({"optimizer": {"type": "AdamWW"}}, "unknown DeepSpeed optimizer.type 'AdamWW'; did you mean 'AdamW'?"),
    ({"scheduler": {"type": "WarmupDecay"}}, "unknown DeepSpeed scheduler.type 'WarmupDecay'; did you mean 'WarmupDecayLR'?"),
    ({"fp16": {"enabled": True, "hysterisis": 2}}, "did you mean 'fp16.hysteresis'?"),
    ({"zzz": 1}, "unknown DeepSpeed config key 'zzz'; see the README's 'From DeepSpeed' table"),
    ({"train_batch_size": "64"}, "DeepSpeed key train_batch_size='64' must be an integer or \"auto\""),
    ({"zero_optimization": {"stage": 4}}, "DeepSpeed key zero_optimization.stage=4 must be one of: 0, 1, 2, 3"),
    ({"zero_optimization": []}, "DeepSpeed key zero_optimization must be a JSON object, not list"),
])
def test_unknown_keys_and_wrong_types(ds_values, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        deepspeed.read(write(tmp_path, ds_values))
    assert message in str(e.value)


@pytest.mark.parametrize("ds_values, named", [
    (json.loads((DATA / "dse_bing_bert_lamb.json").read_text()),
     ["sparse_attention (block-sparse attention)", "optimizer.params.bias_correction (LAMB without bias correction)",
      "optimizer.params.max_coeff (LAMB's trust-ratio clamp"]),
    ({"optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 400}}}, ["optimizer.type=OneBitAdam (1-bit Adam)"]),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
                            "zero_quantized_weights": True, "zero_quantized_gradients": True}},
     ["zero_optimization.offload_optimizer.device (optimizer offload to NVMe", "zero_optimization.zero_quantized_weights",
      "zero_optimization.zero_quantized_gradients"]),
    ({"wandb": {"enabled": True, "project": "x"}, "compression_training": {}}, ["wandb (", "compression_training ("]),
    ({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, ["fp16.consecutive_hysteresis"]),
])
def test_features_llmx_lacks_are_each_named(ds_values, named, tmp_path):
    with pytest.raises(ConfigError) as e:
        deepspeed.read(write(tmp_path, ds_values))
    message = str(e.value)
    assert message.startswith("ds_config turns on DeepSpeed features llmx lacks: ")
    assert all(n in message for n in named), message


def test_turned_off_features_and_auto_pass(tmp_path):
    ds = deepspeed.read(write(tmp_path, {"wandb": {"enabled": False}, "hybrid_engine": {"enabled": False, "x": 1},
                                         "zero_optimization": {"offload_param": {"device": "none"},
                                                               "zero_quantized_weights": False,
                                                               "reduce_bucket_size": "auto"}}))
    assert ds.ignored == ("zero_optimization.reduce_bucket_size",)


BAD_INPUTS = {
    "not JSON": ('{"train_batch_size": 16,}', "is not JSON: Expecting property name enclosed in double quotes at line 1"),
    "duplicate key": ('{"fp16": {}, "fp16": {}}', "has the key 'fp16' twice"),
    "batch does not add up": ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
                              "ds_config batch sizes do not add up: train_batch_size 10 != "),
    "unsupported feature": (DATA / "hf_zero3_offload.json",
                            "llmx lacks: zero_optimization.offload_param (parameter offload to CPU/NVMe)"),
    "misspelt key": (DATA / "dse_megatron_zero3_misspelt.json",
                     "'zero_optimization.stage3_param_persitence_threshold'; did you mean "
                     "'zero_optimization.stage3_param_persistence_threshold'?"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_ds_config_exits_2_with_one_line(name, tmp_path, model_yaml, subprocess_env):
    values, message = BAD_INPUTS[name]
    path = values if isinstance(values, Path) else write(tmp_path, values)
    proc = subprocess.run([PYTHON, "-m", "llmx.train", "--config", str(model_yaml), "--deepspeed", str(path)],
                          cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: "), proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_from_deepspeed_command(tmp_path, model_yaml, subprocess_env):
    proc = subprocess.run([PYTHON, "-m", "llmx.config", "from-deepspeed", str(DATA / "dse_megatron_zero2_fp16.json"),
                           "--config", str(model_yaml), "--devices", "8", "optim.lr=0.01"],
                          cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {w}" for w in REAL_WORLD["dse_megatron_zero2_fp16"][1]]
    assert "  zero_stage: 2  # zero_optimization.stage\n" in proc.stdout
    assert "  lr: 0.01\n" in proc.stdout  # the command line's, so no DeepSpeed comment
    assert "  global_batch_size: 16  # train_batch_size\n" in proc.stdout
    cfg = config_lib.from_dict(yaml.safe_load(proc.stdout))
    assert (cfg.train.micro_batch_size, cfg.train.precision, cfg.model.remat) == (2, "fp16", "full")


def test_launcher_variables():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29400", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert distributed.launcher_env(torchrun) == {"coordinator": "10.0.0.1:29401", "num_processes": 2,
                                                  "process_id": 1, "local_device_ids": [1]}
    ds_launcher = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "MASTER_ADDR": "node0",
                   "MASTER_PORT": "29500"}
    assert distributed.launcher_env(ds_launcher) == {"coordinator": "node0:29500", "num_processes": 4,
                                                     "process_id": 3, "local_device_ids": None}
    assert distributed.launcher_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert distributed.launcher_env({"WORLD_SIZE": "2"}) is None


def test_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# DeepSpeed hostfile\nworker-0 slots=2\n\nworker-1 slots=1  # comment\n")
    hosts = launch.read_hostfile(str(path))
    assert hosts == {"worker-0": 2, "worker-1": 1}
    commands = launch.hostfile_commands(["--config", "a b.yaml"], hosts=hosts, ssh_command="ssh -p 2222",
                                        master_port=29500, devices_per_process=None)
    assert [c[:4] for c in commands] == [["ssh", "-p", "2222", h] for h in ("worker-0", "worker-0", "worker-1")]
    for rank, command in enumerate(commands):
        remote = command[-1]
        assert f" RANK={rank} " in remote and " WORLD_SIZE=3 " in remote and " MASTER_ADDR=worker-0 " in remote
        assert remote.endswith("-u -m llmx.train --config 'a b.yaml'") and remote.startswith("cd ")
    assert " LOCAL_RANK=1 " in commands[1][-1] and " LOCAL_WORLD_SIZE=1 " in commands[2][-1]
    for text, message in [("worker-0 slots=2\nworker-0 slots=1\n", "names worker-0 twice"),
                          ("worker-0\n", "line 1 is not 'host slots=N'"), ("# nothing\n", "names no hosts")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            launch.read_hostfile(str(path))
