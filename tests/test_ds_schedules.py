"""DeepSpeed's four schedulers, translated from a ds_config, against a float64 reference of DeepSpeed's
own code at 20 sampled steps each.

The reference classes below follow deepspeed/runtime/lr_schedules.py at DeepSpeed edaa722 line by line
(the cited line numbers are that file's); their `step()` runs after each optimizer update, as the
engine does (engine.py `_take_model_step`: optimizer.step(), then lr_scheduler.step()), so the lr of
update c is the one set by the constructor and c calls of step().
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmx import config as config_lib
from llmx import deepspeed, optim
from llmx.deepspeed import DeepSpeedConfig
from llmx.errors import ConfigError


class WarmupLR:
    def __init__(self, lr, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000, warmup_type="log"):
        self.min_lr = warmup_min_lr
        self.max_lr = lr if warmup_max_lr is None else warmup_max_lr  # L713-714: the optimizer's lr
        self.delta = self.max_lr - self.min_lr  # L718
        self.warmup_num_steps = max(2, warmup_num_steps)  # L719
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)  # L726
        self.last_batch_iteration = -1
        self.lr = self.get_lr()  # L729-730

    def get_lr(self):  # L732-737
        if self.last_batch_iteration < 0:
            return self.min_lr
        return self.min_lr + self.delta * self._get_gamma()

    def _get_gamma(self):  # L757-763
        if self.last_batch_iteration < self.warmup_num_steps:
            if self.warmup_type == "log":
                return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
            return self.last_batch_iteration / self.warmup_num_steps
        return 1.0

    def step(self):  # L745-749
        self.last_batch_iteration += 1
        self.lr = self.get_lr()


class WarmupDecayLR(WarmupLR):
    def __init__(self, lr, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type="log"):
        self.total_num_steps = total_num_steps  # L798
        super().__init__(lr, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)

    def _get_gamma(self):  # L805-814
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._get_gamma()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR:
    def __init__(self, lr, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000, cos_min_ratio=0.0001,
                 warmup_type="log"):
        self.total_num_steps = total_num_steps
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)  # L865
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)  # L866
        self.org_lr = lr  # L871-873
        self.last_batch_iteration = -1
        self.lr = self.get_lr()  # L876-877

    def get_lr_ratio(self):  # L879-903
        if self.last_batch_iteration < self.warmup_num_steps:
            if self.warmup_type == "log":
                ratio = self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
            else:
                ratio = self.last_batch_iteration / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        cosine_progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * cosine_progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def get_lr(self):  # L911-916
        if self.last_batch_iteration < 0:
            return 0.0
        return self.org_lr * self.get_lr_ratio()

    def step(self):  # L905-909
        self.last_batch_iteration += 1
        self.lr = self.get_lr()


class OneCycle:
    def __init__(self, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0, cycle_first_step_size=2000,
                 cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
                 decay_step_size=0):
        first = float(cycle_first_step_size)  # L495-497
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        self.total_size = first + second  # L506
        self.step_ratio = first / self.total_size  # L507
        self.first_step_size, self.second_step_size = first, second
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (cycle_first_stair_count if cycle_second_stair_count is None
                                   else cycle_second_stair_count)  # L511
        self.decay_step_size = decay_step_size
        self.skip_lr_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_lr_rate, 0)  # L514-534
        self.min_lr, self.max_lr, self.decay_lr_rate = cycle_min_lr, cycle_max_lr, decay_lr_rate
        self.last_batch_iteration = -1
        self.lr = self.min_lr  # L528-529: update_lr(optimizer.param_groups, self.min_lrs)

    def _get_scale_factor(self):  # L557-582
        batch_iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1.0 + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor, stair_count = x / self.step_ratio, self.first_stair_count
        else:
            scale_factor, stair_count = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stair_count > 0:
            cycle_iteration = batch_iteration % self.total_size
            if cycle_iteration <= self.first_step_size:
                stair_position = cycle_iteration * stair_count / self.first_step_size
            else:
                stair_position = (self.total_size - cycle_iteration) * stair_count / self.second_step_size
            scale_factor = math.floor(stair_position) / stair_count
        return scale_factor

    def get_lr(self):  # L595-603, L615-635
        if self.last_batch_iteration < self.total_size:
            return self.min_lr + (self.max_lr - self.min_lr) * self._get_scale_factor()
        if self.skip_lr_decay:
            return self.min_lr
        decay_interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return self.min_lr / (1 + self.decay_lr_rate * decay_interval)

    def step(self):  # L654-664
        self.last_batch_iteration += 1
        self.lr = self.get_lr()


REFERENCES = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
              "OneCycle": OneCycle}
OPTIMIZER_LR = 0.002

# (DeepSpeed scheduler type, its params): every warmup shape, the decay/cosine ends, stairs and decay.
CASES = {
    "WarmupLR-log": ("WarmupLR", {"warmup_min_lr": 1e-5, "warmup_max_lr": 3e-3, "warmup_num_steps": 50}),
    "WarmupLR-linear-optimizer-lr": ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_num_steps": 40,
                                                  "warmup_type": "linear"}),
    "WarmupLR-one-step": ("WarmupLR", {"warmup_max_lr": 1e-3, "warmup_num_steps": 1}),
    "WarmupDecayLR-log": ("WarmupDecayLR", {"total_num_steps": 200, "warmup_min_lr": 2e-5, "warmup_max_lr": 1e-3,
                                            "warmup_num_steps": 30}),
    "WarmupDecayLR-linear-defaults": ("WarmupDecayLR", {"total_num_steps": 120, "warmup_num_steps": 25,
                                                        "warmup_type": "linear"}),
    "WarmupCosineLR-log": ("WarmupCosineLR", {"total_num_steps": 200, "warmup_num_steps": 20,
                                              "warmup_min_ratio": 0.1, "cos_min_ratio": 0.05}),
    "WarmupCosineLR-linear-defaults": ("WarmupCosineLR", {"total_num_steps": 150, "warmup_num_steps": 30,
                                                          "warmup_type": "linear"}),
    "OneCycle-continuous-decay": ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 40,
                                               "cycle_second_step_size": 60, "decay_step_size": 10,
                                               "decay_lr_rate": 0.1, "cycle_momentum": False}),
    "OneCycle-stairs": ("OneCycle", {"cycle_min_lr": 0.004, "cycle_max_lr": 0.015, "cycle_first_step_size": 100,
                                     "cycle_second_step_size": 20, "cycle_first_stair_count": 10,
                                     "cycle_second_stair_count": 4, "decay_step_size": 100, "decay_lr_rate": 0.01,
                                     "cycle_momentum": False}),
    "OneCycle-symmetric-no-decay": ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 5e-3,
                                                 "cycle_first_step_size": 30, "cycle_momentum": False}),
}


def _sampled_steps(params: dict) -> list[int]:
    """20 update indices: the first ones, every phase boundary (+-1), and spread-out steps beyond."""
    marks = [params.get(k, 0) for k in ("warmup_num_steps", "total_num_steps", "cycle_first_step_size")]
    marks.append(params.get("cycle_first_step_size", 0) + params.get("cycle_second_step_size",
                                                                    params.get("cycle_first_step_size", 0)))
    picks = {0, 1, 2, 3}
    for m in marks:
        picks.update({m - 1, m, m + 1, m + 2} if m else set())
    rng = np.random.default_rng(0)
    while len(picks) < 20:
        picks.add(int(rng.integers(4, 320)))
    return sorted(p for p in picks if p >= 0)[:20]


def _reference_lrs(kind: str, params: dict, steps: int) -> list[float]:
    args = {k: v for k, v in params.items() if k not in ("cycle_momentum",)}
    sched = REFERENCES[kind](**args) if kind == "OneCycle" else REFERENCES[kind](OPTIMIZER_LR, **args)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.lr)  # the lr this update runs at
        sched.step()
    return lrs


@pytest.mark.parametrize("case", CASES)
def test_schedule_equals_deepspeed_at_20_steps(case):
    kind, params = CASES[case]
    ds_values = {"optimizer": {"type": "AdamW" if kind != "OneCycle" else "SGD", "params": {"lr": OPTIMIZER_LR}},
                 "scheduler": {"type": kind, "params": params}}
    cfg, _ = deepspeed.load(None, DeepSpeedConfig("ds.json", ds_values, ()), ["train.steps=300"], n_devices=8)
    schedule = optim.schedule(cfg.optim, cfg.train.steps)
    steps = _sampled_steps(params)
    assert len(steps) == 20
    reference = _reference_lrs(kind, params, max(steps) + 1)
    ours = [float(schedule(s)) for s in steps]
    np.testing.assert_allclose(ours, [reference[s] for s in steps], rtol=2e-6, atol=1e-12, err_msg=str(steps))


def test_schedules_are_traceable_and_match_eagerly():
    """The train step evaluates the schedule on a traced int32 count."""
    cfg = config_lib.load(None, ["optim.schedule=one_cycle_linear", "optim.warmup_steps=4", "optim.cycle_up_stairs=2",
                                 "optim.cycle_decay_every=2", "optim.cycle_decay_rate=0.5", "optim.warmup_min_lr=0.1"])
    schedule = optim.schedule(cfg.optim, 100)
    counts = jnp.arange(20, dtype=jnp.int32)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(counts), [float(schedule(int(c))) for c in counts], rtol=1e-6)


def test_one_cycle_linear_needs_a_rising_half():
    cfg = config_lib.load(None, ["optim.schedule=one_cycle_linear", "optim.warmup_steps=0"])
    with pytest.raises(ConfigError, match="warmup_steps >= 1"):
        optim.schedule(cfg.optim, 10)
