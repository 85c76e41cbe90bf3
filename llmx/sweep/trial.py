"""One trial as a real `python -m llmx.train` process, owned by the sweep.

The trial runs in a process group of its own (its own session), so the sweep can stop it and anything it
started with one signal, and a Ctrl-C meant for the sweep does not reach it directly. On Linux it is also
told to stop (SIGTERM: checkpoint and exit) if the sweep process dies. Its stdout and stderr go to
`train.log` in the trial directory; the sweep follows its `metrics.jsonl` as it grows.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG = "train.log"
PGID_FILE = "pgid"
_PR_SET_PDEATHSIG = 1
# Looked up now: between fork and exec (where _die_with_parent runs) loading a library could deadlock.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the sweep (the parent) dies."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class MetricsTail:
    """New complete lines of a growing metrics.jsonl (a half-written last line waits for its newline)."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]


def last_error_line(log_path: Path, *, limit: int = 300) -> str:
    """The line that says why a trial stopped: the entry point's `error: ...` line, else the last
    exception line of a traceback, else the last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log written"
    if not lines:
        return "the trial printed nothing"
    for predicate in (lambda s: s.startswith("error:"),
                      lambda s: s.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt"))):
        hits = [line for line in lines if predicate(line)]
        if hits:
            return hits[-1][:limit]
    return lines[-1][:limit]


class TrialProcess:
    """`python -m llmx.train --config TRIAL_DIR/config.yaml` in TRIAL_DIR's process group."""

    def __init__(self, trial_dir: str | Path, *, env_overlay: dict, cwd: str | Path | None = None):
        self.trial_dir = Path(trial_dir)
        wait_for_leftover(self.trial_dir)
        env = {**os.environ, **env_overlay, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.trial_dir / LOG, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmx.train", "--config", str(self.trial_dir / "config.yaml")],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        self.pgid = self.proc.pid  # a new session's leader: its pid is the group id
        (self.trial_dir / PGID_FILE).write_text(str(self.pgid))
        self._tail = MetricsTail(self.trial_dir / "metrics.jsonl")

    def poll(self) -> tuple[list[dict], int | None]:
        """(metric records written since the last poll, the exit status or None while running).
        The status is read first, so the records include everything a finished trial wrote."""
        status = self.proc.poll()
        records = self._tail.read()
        if status is not None:
            self._log.close()
        return records, status

    def error_line(self) -> str:
        return last_error_line(self.trial_dir / LOG)

    def stop(self, *, graceful: bool, timeout: float = 300.0) -> int:
        """Stops the trial's whole process group. graceful: SIGTERM (the trainer checkpoints and exits;
        SIGKILL after `timeout`); otherwise SIGKILL at once (a pruned trial needs no checkpoint)."""
        if self.proc.poll() is None:
            _signal_group(self.pgid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.proc.wait(timeout=timeout if graceful else 30)
            except subprocess.TimeoutExpired:
                _signal_group(self.pgid, signal.SIGKILL)
                self.proc.wait()
        _signal_group(self.pgid, signal.SIGKILL)  # anything the trainer started and left behind
        self._log.close()
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_leftover(trial_dir: Path, *, timeout: float = 300.0) -> None:
    """Before a trial directory is trained again (a resumed sweep), its previous process group must be
    gone: a sweep killed with SIGKILL leaves its trials checkpointing on their way out. Only processes
    whose command line names this trial's config count (a group id can be reused)."""
    try:
        pgid = int((trial_dir / PGID_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return
    marker = str(trial_dir / "config.yaml")
    deadline = time.monotonic() + timeout
    while any(marker in _cmdline(pid) for pid in group_members(pgid)):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.5)
