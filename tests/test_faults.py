"""Faults a long run meets and inputs a person gets wrong, and what llmx does about them.

`FAULTS` is one table: each row is a command that must stop with exit status 2 and exactly one line on
stderr (`error: ...`, naming the problem and the fix), plus only the lines the row allows by name, and
leave every file it was given as it was (hashed before and after). The next fault is one more row.
The tests after the table show the recoveries: a corrupt newest checkpoint falls back to the previous
one bitwise-exactly, a second trainer is turned away from a run directory and a dead one's lock is
taken over, a failed restore leaves nothing printing behind it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import CACHE, PYTHON, REPO
from helpers import SMALL, assert_trees_equal, checkpoint_steps, launch, read_metrics, small_config, wait_for
from llmx import fit, runlock
from llmx import mesh as mesh_lib
from llmx.errors import ResourceError
from llmx.plan import state_memory
from llmx.run import restore_run
from llmx.step import build_steps
from llmx.train import train

GiB = 2**30

# A Llama of 40.7B parameters (Llama-2-70B's widths, 47 layers): 607 GiB of state before any activation.
BIG = ["model.vocab_size=32000", "model.d_model=8192", "model.n_layers=47", "model.n_heads=64", "model.n_kv_heads=8",
       "model.d_ff=28672", "model.seq_len=2048", "train.micro_batch_size=1"]

PREPARE = ["--config", "configs/tiny.yaml", "data.max_documents=80"]  # llmx.data's arguments before the row's

# llmx's own progress line while a corpus is prepared: the only line some data errors follow.
PREPARING = r"\d\d:\d\d:\d\d preparing \d+ files of "


@dataclasses.dataclass(frozen=True)
class Fault:
    """`python -m <module> <base args> <args(workspace)>` after `setup(workspace)`."""

    args: Callable[[Path], list[str]]
    message: str  # a part of the one error line
    module: str = "llmx.train"
    setup: Callable[[Path], None] = lambda w: None
    base: bool = True  # the small model, workspace/run as train.run_dir and 5 steps before `args`
    trained: bool = False  # the workspace's run starts as a copy of a trained run (checkpoints 2 and 4)
    allowed: tuple[str, ...] = ()  # regexes of other stderr lines this row may print
    max_seconds: float | None = None
    max_rss_gib: float | None = None


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _truncate_largest(step_dir: Path) -> None:
    data = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _live_lock(run_dir: Path) -> None:
    """A lock held by this test process, which is alive while the row runs."""
    holder = dataclasses.asdict(runlock.Holder.me())
    _write(run_dir / runlock.LOCK_FILE, json.dumps(holder))


FAULTS: dict[str, Fault] = {
    # Config (from tests/test_config.py).
    "unknown key": Fault(lambda w: ["model.d_modle=64"], "unknown config key 'model.d_modle'"),
    "wrong type": Fault(lambda w: ["train.micro_batch_size=big"], "train.micro_batch_size='big' has the wrong type"),
    "mesh 3x3 on 8 devices": Fault(lambda w: ["mesh.data=3", "mesh.fsdp=3"],
                                   "data=3xfsdp=3xexpert=1xsequence=1xtensor=1 has 9 devices but 8"),
    # Pipeline arithmetic (llmx.pipeline): the small model has 2 layers.
    "layers not dividing the pipeline": Fault(
        lambda w: ["mesh.pipeline=4", "train.grad_accum_steps=4"],
        "model.n_layers=2 is not divisible by mesh.pipeline 4 x mesh.pipeline_repeats 1 = 4"),
    "fewer micro-batches than stages": Fault(lambda w: ["mesh.pipeline=2", "train.grad_accum_steps=1"],
                                             "train.grad_accum_steps=1 is smaller than mesh.pipeline=2"),
    # A mixture of experts (llmx.models.moe; the other MoE errors: tests/test_moe.py, in process).
    "more experts per token than experts": Fault(
        lambda w: ["model.family=mixtral", "model.n_experts=4", "model.experts_per_token=5"],
        "model.experts_per_token=5 exceeds model.n_experts=4"),
    "zero layers": Fault(lambda w: ["model.n_layers=0"], "model.n_layers=0 is out of range"),
    "heads not dividing d_model": Fault(lambda w: ["model.n_heads=3"],
                                        "model.n_heads=3 does not divide model.d_model=32"),
    "attention kernel on several devices": Fault(
        lambda w: ["model.attention=cpu", "mesh.data=8"],
        "model.attention=cpu runs on one CPU device and this mesh has 8"),  # raised while the step is built
    "missing config file": Fault(lambda w: ["--config", "configs/nope.yaml"],
                                 "config file configs/nope.yaml does not exist", base=False),
    # Paths and data.
    "run_dir is a file": Fault(lambda w: [f"train.run_dir={w / 'notes.txt'}"], "notes.txt is a file, not a directory",
                               setup=lambda w: _write(w / "notes.txt", "not a run")),
    "compilation cache under a file": Fault(lambda w: [f"train.compilation_cache_dir={w / 'notes.txt' / 'jax'}"],
                                            "notes.txt is a file, not a directory",
                                            setup=lambda w: _write(w / "notes.txt", "not a cache")),
    "run_dir in an s3:// bucket": Fault(lambda w: ["train.run_dir=s3://bucket/run"],
                                        "s3:// is not supported (Orbax checkpoints reach only gs:// buckets)"),
    "empty source directory": Fault(lambda w: [f"data.source={w / 'empty'}"], "holds no files",
                                    setup=lambda w: (w / "empty").mkdir()),
    "source of binary files only": Fault(
        lambda w: [f"data.source={w / 'bin'}"], "none of the 2 files holds usable text documents (2 empty, binary",
        setup=lambda w: (_write(w / "bin" / "a.txt", b"\x00\xff\x00" * 100),
                         _write(w / "bin" / "b.py", b"\xff\xfe\xfa")),
        allowed=(PREPARING,)),
    "JSONL without the text field": Fault(
        lambda w: [f"data.source={w / 'j'}"], "2 .jsonl records have no field 'text': set data.text_field",
        setup=lambda w: _write(w / "j" / "d.jsonl", '{"body": "some text"}\n{"body": "more text"}\n'),
        allowed=(PREPARING,)),
    "glob matching nothing": Fault(lambda w: [f"data.source={w}/*.nothing"], "matches no files"),
    "missing tokenizer.json": Fault(lambda w: [f"data.tokenizer={w / 'tok' / 'tokenizer.json'}"],
                                    "no such tokenizer.json"),
    "missing restore_from": Fault(lambda w: [f"checkpoint.restore_from={w / 'elsewhere'}"],
                                  "elsewhere: no such checkpoint, checkpoints directory or run directory"),
    "unknown TFDS dataset": Fault(lambda w: ["data.source=tfds:no_such_dataset_xyz"], "TFDS has no dataset named"),
    # Checkpoints (from tests/test_checkpoint.py).
    "checkpoint of another model": Fault(
        lambda w: ["model.d_ff=48"], "checkpoints/4: parameter blocks/mlp/w_down has shape (2,64,32) in the checkpoint "
        "but (2,48,32)", trained=True),
    "truncated newest checkpoint, on_corrupt=stop": Fault(
        lambda w: ["checkpoint.on_corrupt=stop"], "checkpoints/4: cannot read the checkpoint", trained=True,
        setup=lambda w: _truncate_largest(w / "run" / "checkpoints" / "4")),
    "garbled data-iterator state, on_corrupt=stop": Fault(
        lambda w: ["checkpoint.on_corrupt=stop"], "checkpoints/4: cannot read the checkpoint", trained=True,
        setup=lambda w: _write(w / "run" / "checkpoints" / "4" / "data" / "metadata", '{"rows": {"0": {"par')),
    "every checkpoint unreadable": Fault(
        lambda w: [], "nor can the 1 older one (nothing was moved or deleted)", trained=True,
        setup=lambda w: [_truncate_largest(w / "run" / "checkpoints" / s) for s in ("2", "4")]),
    # The other entry points (from tests/test_data.py).
    "prepare: empty directory": Fault(
        lambda w: ["prepare", *PREPARE, f"data.source={w / 'empty'}"], "holds no files", module="llmx.data",
        base=False, setup=lambda w: (w / "empty").mkdir()),
    "prepare: binary files only": Fault(
        lambda w: ["prepare", *PREPARE, f"data.source={w / 'b'}"], "holds usable text documents", module="llmx.data",
        base=False, setup=lambda w: _write(w / "b" / "x.txt", b"\x00\xff"), allowed=(PREPARING,)),
    "prepare: missing tokenizer.json": Fault(
        lambda w: ["prepare", *PREPARE, f"data.tokenizer={w / 'nope.json'}"], "no such tokenizer.json",
        module="llmx.data", base=False),
    "prepare: unknown TFDS name": Fault(
        lambda w: ["prepare", *PREPARE, "data.source=tfds:no_such_dataset_xyz"], "TFDS has no dataset named",
        module="llmx.data", base=False),
    "evaluate: not a run directory": Fault(
        lambda w: ["--run-dir", str(w / "empty")], "empty is not a run directory: it has no config.yaml",
        module="llmx.evaluate", base=False, setup=lambda w: (w / "empty").mkdir()),
    # Resources.
    "run directory in use": Fault(
        lambda w: [], f"is in use by another trainer: PID {os.getpid()} on {socket.gethostname()}",
        setup=lambda w: _live_lock(w / "run")),
    "40B parameters on the CPU": Fault(
        lambda w: BIG, "this run does not fit: it needs 607.07 GiB per device x 8 devices", max_seconds=60,
        max_rss_gib=2),
}


def _hashes(root: Path) -> dict[str, str]:
    """Every file's hash and every directory, so an empty run directory left behind is a change too."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "directory"
            for p in root.rglob("*")}


def _peak_rss(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Polls the child's VmHWM (its own peak, per exec) until it exits. wait4's ru_maxrss would not do:
    it counts the pages the child shared with this (large) test process when it was forked."""
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        done.wait(0.01)


def run_measured(args: list[str], *, env: dict, log_dir: Path, timeout: float = 300):
    """(exit status, stderr, wall seconds, CPU seconds, peak RSS in bytes) of a child process."""
    with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)
        done, peak = threading.Event(), [0]
        watcher = threading.Thread(target=_peak_rss, args=(proc.pid, done, peak))
        watcher.start()
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
            done.set()
            watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    return proc.returncode, (log_dir / "stderr").read_text(), seconds, cpu, peak[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A run of the small model with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trained")
    train(small_config(root, data_dir, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5"))
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAULTS)
def test_fault_exits_2_with_one_line_and_changes_nothing(name, tmp_path, subprocess_env, data_dir, request):
    fault = FAULTS[name]
    workspace = tmp_path / "w"
    workspace.mkdir()
    if fault.trained:
        trained = request.getfixturevalue("trained_run")
        subprocess.run(["cp", "-a", str(trained), str(workspace / "run")], check=True)
    fault.setup(workspace)
    # Only a trained run's rows get as far as the (shared, prepared) corpus; corpora that fail to prepare
    # leave their partial cache outside the shared one.
    cache = data_dir if fault.trained else tmp_path / "cache"
    base = [*SMALL, f"train.run_dir={workspace / 'run'}", "train.steps=5"]
    before = _hashes(workspace)
    args = [PYTHON, "-m", fault.module, *(base if fault.base else []), *fault.args(workspace),
            f"data.cache_dir={cache}"]
    status, stderr, seconds, cpu, peak_rss = run_measured(args, env=subprocess_env, log_dir=tmp_path)

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert lines and lines[-1].startswith("error: ") and fault.message in lines[-1], stderr
    unexpected = [line for line in lines[:-1] if not any(re.match(p, line) for p in fault.allowed)]
    assert not unexpected, stderr
    assert _hashes(workspace) == before, "files were deleted, changed or added"
    if fault.max_seconds is not None:
        assert seconds < fault.max_seconds, f"{seconds:.1f} s"
    if fault.max_rss_gib is not None:
        assert 0 < peak_rss < fault.max_rss_gib * GiB, f"peak RSS {peak_rss / GiB:.2f} GiB"
    print(f"{name}: {seconds:.1f} s ({cpu:.1f} s CPU), peak RSS {peak_rss / GiB:.2f} GiB")


# A restore that fails on one array while Orbax's other reads are in flight (llmx.checkpoint's
# _DrainingEventLoop): before the fix each failed restore of this 40 MB state printed dozens of
# "Event loop is closed" and "Exception ignored in: <coroutine ...>" tracebacks after the error.
FAILED_RESTORES = """
import sys
from pathlib import Path
import jax, numpy as np
from llmx import config as config_lib, mesh as mesh_lib
from llmx.checkpoint import Checkpointer
from llmx.errors import CorruptCheckpointError
from llmx.step import build_steps

cfg = config_lib.load("configs/tiny.yaml", [])
steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))
target = mesh_lib.abstract_with_shardings(steps.abstract_state, steps.state_shardings)
rng = np.random.default_rng(0)  # random values: zstd leaves them large, so reads take a while
state = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding), target)
ckpt = Checkpointer(sys.argv[1], cfg.checkpoint)
ckpt.save(1, state, data_state={"rows": {}}, config_yaml=cfg.to_yaml())
ckpt.wait()
data = max(Path(sys.argv[1], "1", "state").rglob("d/*"), key=lambda p: p.stat().st_size)
data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
for _ in range(3):
    try:
        ckpt.restore(1, target)
        raise SystemExit("the truncated checkpoint restored")
    except CorruptCheckpointError:
        pass
ckpt.close()
"""


@pytest.mark.slow
def test_a_failed_restore_leaves_nothing_printing_behind_it(tmp_path, subprocess_env):
    script = tmp_path / "failed_restores.py"
    script.write_text(FAILED_RESTORES)
    env = {**subprocess_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([PYTHON, str(script), str(tmp_path / "checkpoints")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if "WARNING:absl" not in line and line.strip()]
    assert noise == [], proc.stderr[-3000:]


# Exact resume from a fallback: a constant schedule, so a run to 6 steps continued to 8 is the run to 8.
FALLBACK = ["optim.schedule=constant", "checkpoint.every=2", "checkpoint.keep=5",
            f"train.compilation_cache_dir={CACHE / 'jax'}"]


def _garble_data_state(step_dir: Path) -> None:
    metadata = step_dir / "data" / "metadata"
    metadata.write_text(metadata.read_text()[:40])


def _delete_config_part(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").unlink()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    return train(small_config(tmp_path_factory.mktemp("uninterrupted"), data_dir, *FALLBACK, "train.steps=8"))


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_largest, _garble_data_state, _delete_config_part],
                         ids=["truncated state file", "garbled data-iterator state", "missing config part"])
def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(
        corrupt, tmp_path, data_dir, uninterrupted, caplog):
    train(small_config(tmp_path, data_dir, *FALLBACK, "train.steps=6"))
    checkpoints = tmp_path / "run" / "checkpoints"
    corrupt(checkpoints / "6")
    corrupted = _hashes(checkpoints / "6")

    with caplog.at_level(logging.INFO, logger="llmx"):
        rerun = train(small_config(tmp_path, data_dir, *FALLBACK, "train.steps=8"))
    assert rerun.start_step == 4
    reports = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    assert len(reports) == 1 and "\n" not in reports[0], reports
    assert f"{checkpoints}/6: cannot read the checkpoint" in reports[0]
    assert f"moved to {checkpoints}/corrupt/6; resumed from {checkpoints}/4 at step 4" in reports[0]
    assert _hashes(checkpoints / "corrupt" / "6") == corrupted  # moved, not changed
    assert checkpoint_steps(tmp_path / "run") == [2, 4, 6, 8]
    assert rerun.losses == {s: uninterrupted.losses[s] for s in range(5, 9)}  # bitwise, not approx
    assert_trees_equal(rerun.params, uninterrupted.params)


def _lock_holder(run_dir: Path) -> dict:
    return json.loads((run_dir / runlock.LOCK_FILE).read_text())


@pytest.mark.slow
def test_a_second_trainer_on_a_run_directory_exits_2_and_the_first_finishes_alone(tmp_path, subprocess_env, data_dir):
    run_dir = tmp_path / "run"
    first = launch(tmp_path, subprocess_env, run_dir, data_dir, "train.steps=5000", "checkpoint.every=10", pause=0.1)
    started = time.monotonic()
    try:
        # The second one comes 10 s later, while the first is training.
        wait_for(first, lambda: time.monotonic() - started >= 10 and (run_dir / "metrics.jsonl").exists(),
                 "the first trainer under way for 10 s")
        assert _lock_holder(run_dir)["pid"] == first.pid
        second = subprocess.run(
            [PYTHON, "-m", "llmx.train", *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={data_dir}",
             "train.steps=5000"], cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2, second.stderr
        assert len(lines) == 1 and f"is in use by another trainer: PID {first.pid} on " in lines[0], second.stderr
        assert first.poll() is None, "the first trainer stopped while the second ran"
        first.send_signal(signal.SIGTERM)  # it finishes: checkpoints its step and exits 0
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-2000:]
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, steps[-1] + 1))  # every step once: the second trainer wrote nothing
    assert checkpoint_steps(run_dir)[-1] == steps[-1]
    assert not (run_dir / runlock.LOCK_FILE).exists()


@pytest.mark.slow
def test_the_lock_of_a_killed_trainer_is_taken_over_and_its_run_resumes(tmp_path, subprocess_env, data_dir, caplog):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=12", "checkpoint.every=2"]
    killed = launch(tmp_path, subprocess_env, run_dir, data_dir, *overrides, pause=0.2)
    try:
        wait_for(killed, lambda: (run_dir / "checkpoints").is_dir() and checkpoint_steps(run_dir) != [],
                 "a checkpoint")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert _lock_holder(run_dir)["pid"] == killed.pid  # kill -9 left its lock behind
    saved = checkpoint_steps(run_dir)

    with caplog.at_level(logging.INFO, logger="llmx"):
        summary = train(small_config(tmp_path, data_dir, *overrides))
    assert any(f"from PID {killed.pid} on " in r.getMessage() and "which is gone" in r.getMessage()
               for r in caplog.records)
    assert summary.start_step == max(saved) and summary.final_step == 12
    assert not (run_dir / runlock.LOCK_FILE).exists()


def test_the_run_lock_is_exclusive_and_released(tmp_path):
    lock = runlock.RunLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(ResourceError, match=rf"is in use by another trainer: PID {os.getpid()} on "):
            runlock.RunLock(tmp_path).acquire()
    finally:
        lock.release()
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    again = runlock.RunLock(tmp_path)
    again.acquire()
    again.release()


def test_a_lock_is_stale_only_when_its_holder_is_gone():
    me = runlock.Holder.me()
    assert me.alive()
    assert not dataclasses.replace(me, process_start="1").alive()  # the PID now belongs to another process
    assert not dataclasses.replace(me, boot_id="rebooted").alive()
    elsewhere = dataclasses.replace(me, host="another-host")
    assert elsewhere.alive()  # a fresh heartbeat
    assert not dataclasses.replace(elsewhere, heartbeat=time.time() - runlock.STALE_SECONDS - 1).alive()


def test_a_waiting_trainer_gets_the_lock_when_it_is_released(tmp_path, caplog):
    holder = runlock.RunLock(tmp_path)
    holder.acquire()
    waiter = runlock.RunLock(tmp_path)
    errors = []

    def wait():
        try:
            waiter.acquire(wait_seconds=120)
        except ResourceError as e:
            errors.append(e)

    with caplog.at_level(logging.INFO, logger="llmx"):
        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 60
        while not any("waiting up to 120 s" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.01)
        holder.release()
        thread.join(timeout=60)
    assert not errors and _lock_holder(tmp_path)["token"] == waiter.holder.token
    waiter.release()


def test_the_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", 0.02)
    lock = runlock.RunLock(tmp_path)
    lock.acquire()
    first = _lock_holder(tmp_path)["heartbeat"]
    deadline = time.monotonic() + 30
    while _lock_holder(tmp_path)["heartbeat"] == first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.01)
    other = dataclasses.replace(runlock.Holder.me(), host="another-host", token="theirs")
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(other)))
    while lock.lost_to is None:
        assert time.monotonic() < deadline, "the takeover went unnoticed"
        time.sleep(0.01)
    assert lock.lost_to.host == "another-host"
    lock.release()
    assert _lock_holder(tmp_path)["token"] == "theirs"  # not ours to delete


def test_reading_a_run_never_takes_its_lock(trained_run, tmp_path):
    """Evaluation, generation and export all start at restore_run."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(trained_run), str(run_dir)], check=True)
    lock = runlock.RunLock(run_dir)
    lock.acquire()
    try:
        before = (run_dir / runlock.LOCK_FILE).read_text()
        restored = restore_run(run_dir=str(run_dir))
        assert restored.step == 4 and (run_dir / runlock.LOCK_FILE).read_text() == before
    finally:
        lock.release()


def test_the_fit_check_passes_a_small_model_and_refuses_with_the_figures(tmp_path, data_dir, monkeypatch):
    cfg = small_config(tmp_path, data_dir)  # mesh.data=8: the state replicated on 8 CPU devices
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))
    assert fit.check(cfg, steps).startswith("fit check: a step needs ")
    state = state_memory(cfg, steps).total

    monkeypatch.setattr(fit, "host_available_bytes", lambda: 4 * state)  # not even 8 copies of the state
    with pytest.raises(ResourceError, match=r"x 8 devices = .*before the step's temporaries.*cheapest fixes: "
                       r"mesh.data=1 mesh.fsdp=-1 mesh.zero_stage=3 \(state [\d.]+ MiB per device\)"):
        fit.check(cfg, steps)
    monkeypatch.setattr(fit, "host_available_bytes", lambda: 8 * state + 1)  # the state fits, the step does not
    with pytest.raises(ResourceError, match=r"temporaries .* from XLA's analysis of the compiled step\).*"
                       r"train.micro_batch_size=\d+ train.grad_accum_steps=\d+ \(same global batch\); "
                       r"model.remat=full"):
        fit.check(cfg, steps)
