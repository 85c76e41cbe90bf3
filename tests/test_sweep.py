"""`python -m llmx.sweep`: the search driver against a stand-in backend (fast), real trials of the small
model as `python -m llmx.train` processes (slow), the Ray backend, `--mode system`, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import PYTHON, REPO
from helpers import AOT_PYTHON, SMALL, needs_extra
from llmx import config as config_lib
from llmx.cli import run as run_cli
from llmx.sweep import command, devices as devices_lib, spec as spec_lib, system
from llmx.sweep.study import Driver, open_study
from llmx.sweep.trial import group_members, last_error_line

COLUMNS = ["trial", "state", "optim.lr", "best_eval_loss", "final_eval_loss", "steps", "wall_seconds", "error", "dir"]


def write_sweep(path: Path, data_dir: Path, sweep: dict, *run: str) -> Path:
    """A sweep file: the small test model (helpers.SMALL) plus `run` overrides and a sweep section."""
    raw: dict = {}
    for text in [*SMALL, f"data.cache_dir={data_dir}", *run]:
        section, key, value = config_lib.parse_override(text)
        raw.setdefault(section, {})[key] = value
    raw["sweep"] = sweep
    path.write_text(yaml.safe_dump(raw))
    return path


def read_results(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    with open(sweep_dir / "results.csv") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def run_sweep(config: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "llmx.sweep", "--config", str(config), *args], cwd=config.parent,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --- the driver against a stand-in backend: no training, a loss computed from the trial's config ------


class _Handle:
    """Finishes at once with an eval loss that is smallest at lr=1e-2, warmup 5."""

    def __init__(self, trial_dir: Path):
        cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
        lr, warmup, steps = cfg["optim"]["lr"], cfg["optim"]["warmup_steps"], cfg["train"]["steps"]
        loss = 2 + abs(math.log10(lr) + 2) + abs(warmup - 5) / 10
        self.records = [{"step": s, "loss": loss + 1, "eval_loss": loss + 1 / s} for s in (steps // 2, steps)]
        self.stopped = None

    def poll(self):
        return self.records, 0

    def stop(self, *, graceful):
        self.stopped = graceful

    def error_line(self):
        return ""


class _Backend:
    capacity = 2

    def __init__(self):
        self.launched = []

    def launch(self, trial_dir, slot):
        self.launched.append(_Handle(trial_dir))
        return self.launched[-1]

    def close(self):
        pass


def _drive(tmp_path, data_dir, sweep: dict):
    path = write_sweep(tmp_path / "s.yaml", data_dir, sweep, "train.steps=20")
    base, spec, name = spec_lib.load(path)
    study = open_study(spec, base, tmp_path, name)
    Driver(study, spec, base, tmp_path, _Backend()).run()
    return study, spec


def test_grid_sampling_enumerates_exactly_the_product(tmp_path, data_dir):
    lrs, warmups = [1e-3, 1e-2, 3e-2], [0, 5]
    study, spec = _drive(tmp_path, data_dir, {"sampler": "grid", "trials": 50, "space": {
        "optim.lr": {"grid": lrs}, "optim.warmup_steps": {"grid": warmups}}})
    trials = study.get_trials()
    assert spec.n_trials == 6 and len(trials) == 6  # trials=50 is capped at the grid's size
    assert sorted((t.params["optim.lr"], t.params["optim.warmup_steps"]) for t in trials) == sorted(
        itertools.product(lrs, warmups))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert study.best_params == {"optim.lr": 1e-2, "optim.warmup_steps": 5}
    # every trial ran on its own resolved config in SWEEP_DIR/trials/NNNN
    for t in trials:
        cfg = config_lib.load(tmp_path / "trials" / f"{t.number:04d}" / "config.yaml")
        assert cfg.optim.lr == t.params["optim.lr"] and cfg.train.run_dir == str(tmp_path / "trials" / f"{t.number:04d}")


def test_tpe_samples_inside_the_box_and_reports_intermediate_values(tmp_path, data_dir):
    study, _ = _drive(tmp_path, data_dir, {"sampler": "tpe", "trials": 8, "startup_trials": 3, "space": {
        "optim.lr": {"log_uniform": ["1e-4", "1e-1"]}, "optim.warmup_steps": {"int": [0, 20]}}})
    trials = study.get_trials()
    assert len(trials) == 8
    for t in trials:
        assert 1e-4 <= t.params["optim.lr"] <= 1e-1 and isinstance(t.params["optim.warmup_steps"], int)
        assert sorted(t.intermediate_values) == [10, 20]  # the evaluations read from metrics.jsonl
        assert t.value == t.intermediate_values[20] and t.user_attrs["steps"] == 20


class _CrashingBackend(_Backend):
    """lr=1e-3 trials exit with status 2 before writing any metrics."""

    def launch(self, trial_dir, slot):
        handle = super().launch(trial_dir, slot)
        if yaml.safe_load((trial_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3:
            (trial_dir / "train.log").write_text("12:00:00 mesh ...\nerror: data.source='x' matches no files\n")
            handle.poll = lambda: ([], 2)
            handle.error_line = lambda: last_error_line(trial_dir / "train.log")
        return handle


def test_a_crashed_trial_fails_with_its_last_error_line_and_the_sweep_goes_on(tmp_path, data_dir):
    path = write_sweep(tmp_path / "s.yaml", data_dir, {"sampler": "grid", "space": {"optim.lr": {"grid": [1e-3, 1e-2]}}},
                       "train.steps=20")
    base, spec, name = spec_lib.load(path)
    study = open_study(spec, base, tmp_path, name)
    Driver(study, spec, base, tmp_path, _CrashingBackend()).run()
    by_lr = {t.params["optim.lr"]: t for t in study.get_trials()}
    assert by_lr[1e-3].state == optuna.trial.TrialState.FAIL
    assert by_lr[1e-3].user_attrs["error"] == "error: data.source='x' matches no files"
    assert by_lr[1e-2].state == optuna.trial.TrialState.COMPLETE


def test_last_error_line_finds_the_exception_of_a_traceback(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad shape\n\n"
                   "I0000 some C++ log line\n")
    assert last_error_line(log) == "ValueError: bad shape"


@pytest.mark.slow
def test_the_system_space_keeps_the_global_batch():
    base = config_lib.load(REPO / "configs/tiny.yaml")
    assert (2, 2, 2) in system.layouts(8, base) and all(t in (1, 2, 4) for _, _, t in system.layouts(8, base))
    found = system.candidates(base, spec_lib.SystemSpace(), 8)
    for c in found:
        t, m = c.cfg.train, c.cfg.mesh
        assert t.micro_batch_size * t.grad_accum_steps * m.data * m.fsdp == 64  # 8 per replica x 8 devices
        assert m.data * m.fsdp * m.tensor == 8
    # fsdp=1 makes every ZeRO stage the same program: it is tried once
    assert {c.row["zero_stage"] for c in found if c.row["fsdp"] == 1} == {0}
    assert {c.row["zero_stage"] for c in found if c.row["fsdp"] == 8} == {0, 1, 2, 3}
    # The base config's sequence parallelism stays; ZeRO shards over fsdp x sequence, so stages differ at fsdp=1
    found = system.candidates(base.replace(mesh={"sequence": 2}), spec_lib.SystemSpace(), 8)
    assert {c.cfg.mesh.sequence for c in found} == {2}
    assert all(c.cfg.mesh.data * c.cfg.mesh.fsdp * c.cfg.mesh.tensor == 4 for c in found)
    assert {c.row["zero_stage"] for c in found if c.row["fsdp"] == 1} == {0, 1, 2, 3}
    # A pipelined base (2 stages x fsdp=4, 2 micro-batches of 8): layouts without stages, the same 64 rows.
    staged = base.replace(mesh={"pipeline": 2, "data": 1, "fsdp": -1}, train={"grad_accum_steps": 2})
    for c in system.candidates(staged, spec_lib.SystemSpace(zero_stage=(3,), remat=("none",)), 8):
        t, m = c.cfg.train, c.cfg.mesh
        assert m.pipeline == 1 and t.micro_batch_size * t.grad_accum_steps * m.data * m.fsdp == 64


def test_devices_are_split_into_disjoint_subsets():
    cpu = devices_lib.detect("auto", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    slots = devices_lib.slot_environments(cpu, parallel=2, environ={"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
    assert [s["XLA_FLAGS"] for s in slots] == ["--foo --xla_force_host_platform_device_count=4"] * 2
    gpu = devices_lib.detect("gpu", {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert [s["CUDA_VISIBLE_DEVICES"] for s in devices_lib.slot_environments(gpu, parallel=4)] == ["0,1", "2,3", "4,5", "6,7"]
    tpu = devices_lib.Devices("tpu", tuple(range(8)))
    slots = devices_lib.slot_environments(tpu, parallel=2)
    assert [s["TPU_VISIBLE_CHIPS"] for s in slots] == ["0,1,2,3", "4,5,6,7"]
    assert {s["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in slots} == {"2,2,1"} and len({s["TPU_PROCESS_PORT"] for s in slots}) == 2
    with pytest.raises(config_lib.ConfigError, match="libtpu runs a process on 1, 2 or 4 chips"):
        devices_lib.slot_environments(devices_lib.Devices("tpu", tuple(range(6))), parallel=2)


# --- bad input: one line, exit 2, nothing made ---------------------------------------------------------

BAD = {
    "unknown path": (["sweep.space.optim.learning_rate={log_uniform: [1e-4, 1e-2]}"],
                     "error: sweep.space.optim.learning_rate: unknown config key 'optim.learning_rate'; did you mean optim.lr?"),
    "empty range": (["sweep.space.optim.b1={uniform: [0.9, 0.5]}"],
                    "error: sweep.space.optim.b1: [0.9, 0.5] is an empty range; the low bound must be below the high one"),
    "log of zero": (["sweep.space.optim.lr={log_uniform: [0, 1e-2]}"],
                    "error: sweep.space.optim.lr: log_uniform needs positive bounds, got [0.0, 0.01]; use uniform for 0"),
    "empty grid": (["sweep.space.optim.lr={grid: []}"], "error: sweep.space.optim.lr: grid needs a non-empty list, got []"),
    "value the config refuses": (["sweep.space.optim.b1={uniform: [0.5, 1.5]}"],
                                 "error: sweep.space.optim.b1: optim.b1=1.5 is out of range; must be <= 1.0"),
    "more trials than subsets": (["sweep.parallel=16"], "error: sweep.parallel=16 trials cannot each get at least 1 of "
                                 "this machine's 8 CPU device(s); use sweep.parallel <= 8 (or set "
                                 "XLA_FLAGS=--xla_force_host_platform_device_count=N for N simulated CPU devices)"),
    "ray without the extra": (["sweep.backend=ray"], "error: sweep.backend=ray needs the ray extra: pip install -e '.[ray]'"),
    "grid of a range": (["sweep.sampler=grid"], "error: sampler=grid needs listed values; give optim.lr a {grid: [...]} "
                        "instead of a range"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_and_makes_nothing(name, tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    path = write_sweep(tmp_path / "s.yaml", data_dir, {"space": {"optim.lr": {"log_uniform": [1e-4, 1e-2]}}})
    overrides, message = BAD[name]
    code = run_cli(lambda: command.main(["--config", str(path), f"sweep.dir={tmp_path / 'out'}", *overrides]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [message]
    assert not (tmp_path / "out").exists()


def test_the_entry_point_exits_2(tmp_path, data_dir, subprocess_env):
    path = write_sweep(tmp_path / "s.yaml", data_dir, {"space": {"optim.lr": {"log_uniform": [1e-4, 1e-2]}},
                                                       "dir": str(tmp_path / "out"), "samplr": "tpe"})
    proc = subprocess.run([PYTHON, "-m", "llmx.sweep", "--config", str(path)], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown key 'sweep.samplr'; did you mean sweep.sampler?"
    assert not (tmp_path / "out").exists()


# --- real trials ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_trials_split_the_devices_a_diverged_trial_fails_and_best_yaml_trains(tmp_path, data_dir, subprocess_env):
    path = write_sweep(tmp_path / "s.yaml", data_dir, {
        "space": {"optim.lr": {"grid": [3e-3, 1e30]}}, "sampler": "grid", "parallel": 2, "dir": "out"},
        "train.steps=12", "train.eval_every=4")
    proc = run_sweep(path, subprocess_env)
    names, rows = read_results(tmp_path / "out")
    assert names == COLUMNS
    by_lr = {float(r["optim.lr"]): r for r in rows}
    assert by_lr[3e-3]["state"] == "COMPLETE" and float(by_lr[3e-3]["final_eval_loss"]) < 5.9
    assert by_lr[1e30]["state"] == "FAIL" and by_lr[1e30]["error"].startswith("diverged: the loss is not finite at step")
    for r in rows:  # 8 devices, 2 trials at once: 4 each
        assert "on 4 cpu devices" in (tmp_path / r["dir"] / "train.log").read_text()
    assert "best: trial" in proc.stdout and (tmp_path / "out" / "history.png").is_file()
    # best.yaml runs as is (its run directory is fresh: runs/s-best); on the trial's 4 devices (mesh.data=-1
    # fills the devices, so the global batch is the trial's) it trains to the trial's eval loss
    best = config_lib.load(tmp_path / "out" / "best.yaml")
    assert best.optim.lr == 3e-3 and best.train.run_dir == "runs/s-best"
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    train = subprocess.run([PYTHON, "-m", "llmx.train", "--config", "out/best.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    final = [json.loads(line) for line in (tmp_path / "runs/s-best/metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 12 and final["eval_loss"] == pytest.approx(float(by_lr[3e-3]["final_eval_loss"]), rel=1e-5)


@pytest.mark.slow
def test_a_pruned_trial_is_stopped_with_its_process_group(tmp_path, data_dir, subprocess_env):
    # Grid order with seed 0 is (3e-3, 1e-6): the good run completes first, the slow one is measured against it.
    path = write_sweep(tmp_path / "s.yaml", data_dir, {
        "space": {"optim.lr": {"grid": [1e-6, 3e-3]}}, "sampler": "grid", "pruner": "median",
        "startup_trials": 1, "devices_per_trial": 1, "dir": "out"}, "train.steps=400", "train.eval_every=5",
        "train.log_every=5")
    run_sweep(path, subprocess_env)
    _, rows = read_results(tmp_path / "out")
    assert [float(r["optim.lr"]) for r in rows] == [3e-3, 1e-6] and rows[0]["state"] == "COMPLETE"
    assert rows[1]["state"] == "PRUNED" and int(rows[1]["steps"]) < 400
    pgid = int((tmp_path / rows[1]["dir"] / "pgid").read_text())
    assert group_members(pgid) == []  # no orphan: the trainer and anything it started are gone
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, data_dir, subprocess_env):
    path = write_sweep(tmp_path / "s.yaml", data_dir, {
        "space": {"optim.lr": {"grid": [1e-3, 3e-3, 1e-2]}}, "sampler": "grid", "devices_per_trial": 1, "dir": "out"},
        "train.steps=150", "train.eval_every=50", "train.log_every=5", "checkpoint.every=10")
    sweep = subprocess.Popen([PYTHON, "-m", "llmx.sweep", "--config", str(path)], cwd=tmp_path, env=subprocess_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "out/trials/0001/metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (second.is_file() and any(json.loads(x)["step"] >= 20 for x in second.read_text().splitlines())):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    sweep.send_signal(signal.SIGKILL)  # no clean-up by the sweep; its trial is told to stop as it dies
    sweep.wait()
    first = (tmp_path / "out/trials/0000/metrics.jsonl").read_bytes()
    run_sweep(path, subprocess_env)
    _, rows = read_results(tmp_path / "out")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert (tmp_path / "out/trials/0000/metrics.jsonl").read_bytes() == first  # not rerun
    records = [json.loads(x) for x in second.read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r].count(0) == 1  # resumed from its checkpoint
    assert (tmp_path / "out/trials/0001/train.log").read_text().count("per-device state") == 2 and records[-1]["step"] == 150


@pytest.mark.slow
def test_ray_backend_runs_three_trials(tmp_path, data_dir, subprocess_env):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install -e '.[ray]' to test sweep.backend=ray")
    path = write_sweep(tmp_path / "s.yaml", data_dir, {
        "space": {"optim.lr": {"grid": [1e-3, 3e-3, 1e-2]}}, "sampler": "grid", "backend": "ray", "parallel": 2,
        "dir": "out"}, "train.steps=8", "train.eval_every=4")
    run_sweep(path, subprocess_env)
    names, rows = read_results(tmp_path / "out")
    assert names == COLUMNS and [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert sorted(float(r["optim.lr"]) for r in rows) == [1e-3, 3e-3, 1e-2]
    for r in rows:
        assert int(r["steps"]) == 8 and float(r["final_eval_loss"]) < 6
        assert "on 4 cpu devices" in (tmp_path / r["dir"] / "train.log").read_text()


# --- --mode system --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_system_mode_on_the_cpu_mesh_times_the_best_and_writes_best_yaml(tmp_path, subprocess_env):
    # 2 sequences per replica keep the timed steps short; the model is tiny.yaml's
    args = ["--mode", "system", "--config", str(REPO / "configs/tiny.yaml"), "train.micro_batch_size=2",
            "sweep.system.mesh=[[8,1,1],[1,8,1]]", "sweep.system.zero_stage=[0,3]", "sweep.system.remat=[none]",
            "sweep.system.micro_batch_size=[2]", "sweep.system.measure=2", "sweep.system.measure_steps=2",
            f"sweep.dir={tmp_path / 'sys'}"]
    proc = subprocess.run([PYTHON, "-m", "llmx.sweep", *args], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sys/system.csv")))
    # data=8: stage 0 only (no fsdp group to shard over); fsdp=8: stages 0 and 3
    assert len(rows) == 3 and all(r["fits"] == "True" and float(r["estimated_ms"]) > 0 for r in rows)
    assert {(r["data"], r["zero_stage"]) for r in rows} == {("8", "0"), ("1", "0"), ("1", "3")}
    measured = [r for r in rows if r["measured_ms"]]
    # the same FLOPs everywhere: the two steps with the fewest collectives are timed
    assert len(measured) == 2 and rows[0] in measured
    assert max(int(r["collectives"]) for r in measured) <= min(int(r["collectives"]) for r in rows if r not in measured)
    assert float(rows[0]["measured_ms"]) == min(float(r["measured_ms"]) for r in measured)
    best = config_lib.load(tmp_path / "sys/best.yaml")
    assert (best.mesh.data, best.mesh.fsdp, best.mesh.zero_stage, best.train.micro_batch_size) == (
        int(rows[0]["data"]), int(rows[0]["fsdp"]), int(rows[0]["zero_stage"]), int(rows[0]["micro_batch_size"]))
    assert "fastest: mesh" in proc.stdout


@pytest.mark.aot_tpu
def test_system_mode_for_a_tpu_slice_drops_what_does_not_fit():
    needs_extra("libtpu", "tpu")
    needs_extra("optuna", "sweep")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmx-sweep-system-{os.getpid()}"
    args = ["--mode", "system", "--target", "v5e:2x2", "--config", "configs/llama_1b_v5e8.yaml",
            "model.seq_len=1024", "train.micro_batch_size=1", "sweep.system.mesh=[[1,4,1]]",
            "sweep.system.zero_stage=[0,3]", "sweep.system.remat=[full]", f"sweep.dir={out}"]
    proc = subprocess.run([AOT_PYTHON, "-m", "llmx.sweep", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {int(r["zero_stage"]): r for r in csv.DictReader(open(out / "system.csv"))}
    # ZeRO-0 keeps 16 bytes per parameter on every 16 GiB chip: the compiler refuses it
    assert rows[0]["fits"] == "False" and "short by" in rows[0]["note"] and not rows[0]["estimated_ms"]
    assert rows[3]["fits"] == "True" and float(rows[3]["estimated_ms"]) > 0 and not rows[3]["measured_ms"]
    best = config_lib.load(out / "best.yaml")
    assert best.mesh.zero_stage == 3 and best.mesh.fsdp == 4 and best.model.remat == "full"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_config_loads(path):
    base, spec, name = spec_lib.load(path)
    spec_lib.check_hyper(spec)
    assert spec.space and name == path.stem and base.train.steps > 0
