"""One trainer per run directory: an exclusive lock file, `<run_dir>/trainer.lock`.

Two trainers on one run directory (a job restarted while its old copy still runs, two users with one
config) would both write checkpoints and `metrics.jsonl`. The second one now stops with exit 2 naming
the first, or waits for it with `train.wait_for_lock=SECONDS`. Only the trainer takes the lock:
evaluation, generation and export only read a run.

Why a lock file and not `flock`: shared filesystems (NFS, Lustre, FUSE mounts of object stores) do not
all honour `flock` across hosts. The lock is created atomically the classic NFS-safe way: written in
full under a temporary name, then hard-linked to `trainer.lock` (`link` fails when the name exists), so
a reader never sees a half-written lock. It holds who holds it (host, boot id, PID and the process's
start time, a random token) and a heartbeat that a thread rewrites every `HEARTBEAT_SECONDS` (a
temporary file renamed over it).

A lock is stale when its holder is gone: on the same host, when no live process has its PID and start
time (kill -9, a crash, a reboot: taken over at once); from another host, when its heartbeat is older
than `STALE_SECONDS`. A stale lock is taken over by renaming it away (one of several racing trainers
wins the rename) and creating a new one. In a multi-process job only process 0 holds the lock; the
others learn from it whether the run goes on.

On an object store (`train.run_dir=gs://...`) there are no hard links or atomic renames. There the lock
object is created with a conditional write (fsspec's `mode="create"`: GCS `ifGenerationMatch=0`, S3
`If-None-Match`), which fails when it exists, and the heartbeat overwrites it whole (an object is
replaced atomically: a reader sees the old holder or the new one). A stale lock is taken over by
deleting it (after reading it again) and creating a new one; the delete is not conditional, so two
trainers racing to take over one stale lock can both believe they won, for up to one heartbeat: the
loser's next heartbeat reads the winner's token, and the loser stops at the next step boundary
(`hooks.KeepRunLock`), as it does whenever another trainer takes its lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import jax

from llmx import distributed, storage
from llmx.errors import ResourceError

log = logging.getLogger(__name__)

LOCK_FILE = "trainer.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0  # a heartbeat this old means the holder on another host is gone
POLL_SECONDS = 1.0  # how often a waiting trainer looks again


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which tells a
    PID's current process from an earlier one that had it; None if no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": field 3 (state) is fields[0]
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lock file says about the trainer that holds it."""

    host: str
    boot_id: str
    pid: int
    process_start: str
    started: float  # time.time() when it took the lock
    heartbeat: float  # time.time() of its last heartbeat
    token: str

    @classmethod
    def me(cls) -> Holder:
        pid, now = os.getpid(), time.time()
        return cls(socket.gethostname(), _boot_id(), pid, _process_start(pid) or "", now, now, uuid.uuid4().hex)

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return time.time() - self.heartbeat < STALE_SECONDS
        if self.boot_id != _boot_id():
            return False  # the host rebooted since
        if Path("/proc/self/stat").exists():
            return _process_start(self.pid) == self.process_start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's live process
        return True

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"PID {self.pid} on {self.host} (started {started}, heartbeat {time.time() - self.heartbeat:.0f} s "
                "ago)")


def _parse(path, text: str | None) -> Holder | None:
    """The holder named in a lock file's text; None when there is no file."""
    if text is None:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise ResourceError(
            f"{path} is not a trainer lock ({e}); delete it if no trainer uses this run directory"
        ) from None


def _read(path: Path) -> Holder | None:
    """The holder named in a lock file; None when there is none (or it vanished meanwhile)."""
    try:
        return _parse(path, path.read_text())
    except FileNotFoundError:
        return None


def _write_temporary(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f"{path.name}.{holder.token}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(holder)))
    return tmp


class LocalLockFile:
    """The lock file on a POSIX filesystem (local, NFS, Lustre): created by `link`, replaced by `rename`."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> Holder | None:
        return _read(self.path)

    def create(self, holder: Holder) -> bool:
        tmp = _write_temporary(self.path, holder)
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists (on NFS too)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def take_over(self, stale: Holder, holder: Holder) -> bool:
        """Renames a stale lock away (only one racing trainer succeeds) and deletes it; if what was
        renamed is not the stale lock that was read (another trainer took it over first), puts it back."""
        moved = self.path.with_name(f"{self.path.name}.stale.{holder.token}")
        try:
            self.path.rename(moved)
        except FileNotFoundError:
            return False
        taken = (_read(moved) or stale).token == stale.token
        if not taken:
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        moved.unlink()
        return taken

    def replace(self, holder: Holder) -> None:
        _write_temporary(self.path, holder).replace(self.path)

    def delete(self) -> None:
        self.path.unlink()


class ObjectLockFile:
    """The lock object in a bucket (module docstring: conditional create, whole-object overwrite)."""

    def __init__(self, path):
        import fsspec  # with the scheme's filesystem (gcsfs), checked by llmx.storage.check

        self.path = path
        self._fs, self._key = fsspec.core.url_to_fs(str(path))

    def read(self) -> Holder | None:
        try:
            return _parse(self.path, self._fs.cat_file(self._key).decode())
        except FileNotFoundError:
            return None

    def create(self, holder: Holder) -> bool:
        try:
            self._fs.pipe_file(self._key, json.dumps(dataclasses.asdict(holder)).encode(), mode="create")
            return True
        except FileExistsError:
            return False

    def take_over(self, stale: Holder, holder: Holder) -> bool:
        current = self.read()
        if current is None or current.token != stale.token:
            return False  # released, or taken over by another trainer meanwhile
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._key)
        return True

    def replace(self, holder: Holder) -> None:
        self._fs.pipe_file(self._key, json.dumps(dataclasses.asdict(holder)).encode())

    def delete(self) -> None:
        self._fs.rm_file(self._key)


class RunLock:
    """The lock of one run directory, held by this process between `acquire` and `release`."""

    def __init__(self, run_dir: Path):
        self.path = storage.path(run_dir) / LOCK_FILE
        self.file = ObjectLockFile(self.path) if storage.is_remote(self.path) else LocalLockFile(self.path)
        self.holder = Holder.me()
        self.lost_to: Holder | None = None  # set by the heartbeat if another trainer took the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take_over(self, stale: Holder) -> None:
        if self.file.take_over(stale, self.holder):
            log.info("took over the lock of %s from %s, which is gone", self.path.parent, stale.describe())

    def acquire(self, *, wait_seconds: float = 0.0) -> None:
        """Takes the lock, waiting up to `wait_seconds` for a live holder to finish; a ResourceError
        naming the holder when it does not."""
        deadline = time.monotonic() + wait_seconds
        announced = False
        while not self.file.create(self.holder):
            holder = self.file.read()
            if holder is None:
                continue  # released meanwhile
            if not holder.alive():
                self._take_over(holder)
                continue
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                raise ResourceError(
                    f"{self.path.parent} is in use by another trainer{waited}: {holder.describe()}, see {self.path}; "
                    "wait for it with train.wait_for_lock=SECONDS, or use another train.run_dir"
                )
            if not announced:
                log.info("waiting up to %g s for %s, in use by %s", wait_seconds, self.path.parent, holder.describe())
                announced = True
            time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
        self._thread = threading.Thread(target=self._beat, name="llmx-run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                current = self.file.read()
            except ResourceError:  # caught mid-write by a writer that does not rename: read it at the next beat
                continue
            if current is None or current.token != self.holder.token:
                self.lost_to = current or self.holder
                log.warning("lost the lock of %s to %s", self.path.parent,
                            current.describe() if current else "nobody (the lock file was deleted)")
                return
            try:
                self.file.replace(dataclasses.replace(self.holder, heartbeat=time.time()))
            except OSError as e:  # a full disk or a vanished directory: try again at the next beat
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            current = self.file.read()
            if current is not None and current.token == self.holder.token:
                self.file.delete()


@contextlib.contextmanager
def hold(run_dir: Path, *, wait_seconds: float = 0.0) -> Iterator[RunLock | None]:
    """The run directory's lock, held by process 0 for the duration (None on the other processes);
    every process raises the same ResourceError when process 0 cannot take it."""
    lock = RunLock(run_dir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire(wait_seconds=wait_seconds)
        except ResourceError as e:
            error = str(e)
    error = distributed.gather_json(error)[0]
    if error is not None:
        raise ResourceError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
