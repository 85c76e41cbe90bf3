"""`python -m llmx.launch --num-processes N [--devices-per-process K] -- <llmx.train arguments>`

Starts N local processes of `python -m llmx.train` joined through `jax.distributed` on 127.0.0.1: for
testing multi-host behaviour on one machine and for small clusters-on-a-box. Each child's output is
forwarded line by line with a `[pI]` prefix. As soon as one process fails, the others are stopped and
the launcher exits with that process's status; children also die with the launcher (no orphans).
SIGINT/SIGTERM are forwarded, so every process checkpoints and exits cleanly (preemption).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the launcher dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def child_env(*, index: int, num_processes: int, port: int, devices_per_process: int | None) -> dict:
    env = dict(os.environ, LLMX_COORDINATOR=f"127.0.0.1:{port}", LLMX_NUM_PROCESSES=str(num_processes),
               LLMX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        first = index * devices_per_process  # GPU boxes: each process gets its own K GPUs
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(first + i) for i in range(devices_per_process)))
    return env


def launch(command: list[str], *, num_processes: int, devices_per_process: int | None, grace_s: float = 10.0) -> int:
    port = free_port()
    procs = [
        subprocess.Popen(
            command,
            env=child_env(index=i, num_processes=num_processes, port=port, devices_per_process=devices_per_process),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent,
        )
        for i in range(num_processes)
    ]
    threads = [threading.Thread(target=_forward, args=(p, f"[p{i}] "), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()

    def forward_signal(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    status = 0
    while True:
        codes = [p.poll() for p in procs]  # poll every child: `any()` would stop at the first live one
        if all(c is not None for c in codes):
            break
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            print(f"llmx.launch: process {i} exited with status {code}; stopping the others", file=sys.stderr)
            status = code if code > 0 else 128 - code
            _stop(procs, grace_s)
            break
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=5)
    if not status:
        codes = [p.returncode for p in procs]
        bad = [(i, c) for i, c in enumerate(codes) if c != 0]
        if bad:
            i, code = bad[0]
            print(f"llmx.launch: process {i} exited with status {code}", file=sys.stderr)
            status = code if code > 0 else 128 - code
    return status


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="simulated CPU devices per process (and CUDA_VISIBLE_DEVICES on GPU boxes)")
    parser.add_argument("--module", default="llmx.train", help="the llmx entry point to run (default llmx.train)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the entry point's arguments")
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if args.num_processes < 1:
        parser.error("--num-processes must be at least 1")
    return launch([sys.executable, "-m", args.module, *rest], num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process)


if __name__ == "__main__":
    raise SystemExit(main())
