"""Several jax.distributed processes on one machine (gloo CPU collectives), launched by llmx.launch."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import PYTHON, REPO
from helpers import SMALL, step_losses
from llmx import config as config_lib
from llmx.launch import free_port
from llmx.train import train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

COMMON = [*SMALL, "optim.schedule=constant", "train.micro_batch_size=2", "mesh.data=1", "mesh.fsdp=8"]


def launch(args, env, *, processes=2, timeout=600):
    return subprocess.run(
        [PYTHON, "-m", "llmx.launch", "--num-processes", str(processes), "--devices-per-process", str(8 // processes),
         "--", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def one_process(overrides, run_dir, data_dir):
    cfg = config_lib.load(None, [*overrides, f"train.run_dir={run_dir}", f"data.cache_dir={data_dir}"])
    return train(cfg)


@pytest.mark.parametrize("stage", [0, 3])
def test_two_processes_train_like_one(stage, tmp_path, data_dir, subprocess_env):
    overrides = [*COMMON, "train.steps=10", f"mesh.zero_stage={stage}"]
    proc = launch([*overrides, f"train.run_dir={tmp_path / 'two'}", f"data.cache_dir={data_dir}"], subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[p1]" in proc.stdout or "[p0]" in proc.stdout
    reference = one_process(overrides, tmp_path / "one", data_dir).losses
    two = step_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 11))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [reference[s] for s in sorted(reference)], rtol=1e-5)


def test_checkpoints_move_between_process_counts(tmp_path, data_dir, subprocess_env):
    reference = one_process([*COMMON, "train.steps=8", "mesh.zero_stage=3"], tmp_path / "ref", data_dir).losses
    # 2 processes write step 4, 1 process resumes to 6; then 2 processes resume to 8.
    run = tmp_path / "moving"
    args = [*COMMON, "mesh.zero_stage=3", f"train.run_dir={run}", f"data.cache_dir={data_dir}"]
    first = launch([*args, "train.steps=4"], subprocess_env)
    assert first.returncode == 0, first.stdout[-3000:]
    middle = one_process([*COMMON, "mesh.zero_stage=3", "train.steps=6"], run, data_dir)
    assert middle.start_step == 4
    last = launch([*args, "train.steps=8"], subprocess_env)
    assert last.returncode == 0, last.stdout[-3000:]
    losses = step_losses(run)
    np.testing.assert_allclose([losses[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=1e-5)


def _alive(pids):
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]


def test_killing_one_process_stops_the_launch(tmp_path, data_dir, subprocess_env):
    args = [*COMMON, "train.steps=100000", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_dir}"]
    launcher = subprocess.Popen(
        [PYTHON, "-m", "llmx.launch", "--num-processes", "2", "--devices-per-process", "4", "--", *args],
        cwd=REPO, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    children = []
    deadline = time.time() + 240
    while len(children) < 2:
        assert time.time() < deadline and launcher.poll() is None
        out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in out]
        time.sleep(0.2)
    while not (tmp_path / "run" / "metrics.jsonl").exists():  # both are training
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.2)
    victim = children[1]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    _, stderr = launcher.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert launcher.returncode != 0
    assert "process 1 exited with status -9" in stderr or "process 0 exited" in stderr, stderr
    time.sleep(0.5)
    assert not _alive(children)


def test_a_missing_peer_is_an_error_after_the_timeout(tmp_path, data_dir, subprocess_env):
    env = dict(subprocess_env, LLMX_COORDINATOR="127.0.0.1:1", LLMX_NUM_PROCESSES="2", LLMX_PROCESS_ID="1",
               LLMX_INIT_TIMEOUT="5", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    t0 = time.time()
    proc = subprocess.run([PYTHON, "-m", "llmx.train", *COMMON, f"train.run_dir={tmp_path / 'r'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 90
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: process 1 could not join 2 processes at coordinator 127.0.0.1:1 within 5 s"), proc.stderr[-2000:]


def test_process_0_without_its_peer_is_an_error_after_the_timeout(tmp_path, subprocess_env):
    env = dict(subprocess_env, LLMX_COORDINATOR=f"127.0.0.1:{free_port()}", LLMX_NUM_PROCESSES="2",
               LLMX_PROCESS_ID="0", LLMX_INIT_TIMEOUT="5", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([PYTHON, "-m", "llmx.train", *COMMON, f"train.run_dir={tmp_path / 'r'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "process 0 waited 5 s" in last and "missing: 1" in last, proc.stderr[-2000:]


# torchrun and DeepSpeed-launcher variables: 2 processes x 4 CPU devices against 1 x 8, ZeRO-3 over fsdp=8.
LAUNCHED = [*COMMON, "train.steps=3", "mesh.zero_stage=3"]
TORCHRUN = shutil.which("torchrun", path=str(Path(PYTHON).parent))


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, data_dir):
    summary = one_process(LAUNCHED, tmp_path_factory.mktemp("one"), data_dir)
    return [summary.losses[s] for s in (1, 2, 3)]


def _four_devices(env: dict) -> dict:
    return dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")


@pytest.mark.parametrize("runner", ["torchrun", "stand-in"])
def test_torchrun_two_processes_train_like_one(runner, tmp_path, data_dir, subprocess_env, one_process_losses):
    if runner == "torchrun" and TORCHRUN is None:
        pytest.skip("torch is not installed here; the stand-in sets the same variables (pip install -e '.[hf]')")
    launcher = [TORCHRUN] if runner == "torchrun" else [PYTHON, str(REPO / "tests" / "torchrun_standin.py")]
    proc = subprocess.run(
        [*launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "llmx.train", *LAUNCHED,
         f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_dir}"],
        cwd=REPO, env=_four_devices(subprocess_env), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "joined 2 processes; 4 local of 8 devices" in proc.stderr, proc.stderr[-3000:]
    losses = step_losses(tmp_path / "run")
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], one_process_losses, rtol=1e-5)


def test_hostfile_launch_over_ssh_trains_like_one(tmp_path, data_dir, subprocess_env, one_process_losses):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# DeepSpeed's format\nlocalhost slots=2\n")
    env = _four_devices(dict(subprocess_env, SSH_STANDIN_LOG=str(tmp_path / "ssh.log")))
    proc = subprocess.run(
        [PYTHON, "-m", "llmx.launch", "--hostfile", str(hostfile), "--master-port", str(free_port()),
         "--ssh-command", f"{PYTHON} {REPO / 'tests' / 'ssh_standin.py'}", "--devices-per-process", "4", "--",
         *LAUNCHED, f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ssh.log").read_text().split() == ["localhost", "localhost"]
    assert "[p1]" in proc.stdout and "joined 2 processes; 4 local of 8 devices" in proc.stdout, proc.stdout[-3000:]
    losses = step_losses(tmp_path / "run")
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], one_process_losses, rtol=1e-5)


def _process_id(pid: int) -> int:
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"LLMX_PROCESS_ID=")).split(b"=", 1)[1])


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, data_dir, subprocess_env):
    """A preemption notice reaching one host only: both processes agree (train.stop_check_every), save the
    same step and exit 0; rerunning resumes from it with the losses of an uninterrupted run."""
    run = tmp_path / "run"
    args = [*COMMON, "mesh.zero_stage=3", "train.stop_check_every=2", f"train.run_dir={run}", f"data.cache_dir={data_dir}"]
    launcher = subprocess.Popen(
        [PYTHON, "-m", "llmx.launch", "--num-processes", "2", "--devices-per-process", "4", "--", *args,
         "train.steps=100000"], cwd=REPO, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 400
    children: list[int] = []
    while len(children) < 2:
        assert time.time() < deadline and launcher.poll() is None
        out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in out]
        time.sleep(0.2)
    while not (run / "metrics.jsonl").exists() or not step_losses(run):  # both are past step 1
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.2)
    (victim,) = [pid for pid in children if _process_id(pid) == 1]
    os.kill(victim, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    stop = saved[-1]
    assert stop % 2 == 0 and max(step_losses(run)) == stop, output[-3000:]
    said = f"SIGTERM received: checkpointing step {stop} and exiting"
    assert [line.startswith("[p0]") and said in line for line in output.splitlines()].count(True) == 1, output[-3000:]
    assert [line.startswith("[p1]") and f"process 1: {said}" in line for line in output.splitlines()].count(True) == 1

    resumed = launch([*args, f"train.steps={stop + 2}"], subprocess_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    losses = step_losses(run)
    reference = one_process([*COMMON, "mesh.zero_stage=3", f"train.steps={stop + 2}"], tmp_path / "ref", data_dir).losses
    np.testing.assert_allclose([losses[s] for s in range(1, stop + 3)], [reference[s] for s in range(1, stop + 3)],
                               rtol=1e-5)
