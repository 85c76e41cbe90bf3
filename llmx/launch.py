"""`python -m llmx.launch --num-processes N [--devices-per-process K] -- <llmx.train arguments>`
`python -m llmx.launch --hostfile FILE [--ssh-command CMD] -- <llmx.train arguments>`

The first starts N local processes of `python -m llmx.train` joined through `jax.distributed` on
127.0.0.1: for testing multi-host behaviour on one machine and for small clusters-on-a-box. The second
reads DeepSpeed's hostfile (`host slots=N` lines, `#` comments; deepspeed/launcher/runner.py
`_parse_hostfile`) and starts one process per slot on its host through ssh (`--ssh-command` or
`LLMX_SSH_COMMAND` replaces `ssh`), each with the variables DeepSpeed's launcher sets (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` = the first host, `MASTER_PORT`), which
`llmx.distributed` reads; the remote command changes to this directory and exports `PYTHON*`, `LLMX_*`,
`JAX_*`, `XLA_*`, `NCCL_*`, `HF_*` variables (the nodes share the file system, as with DeepSpeed).

Each child's output is forwarded line by line with a `[pI]` prefix. As soon as one process fails, the
others are stopped and the launcher exits with that process's status; children also die with the
launcher (no orphans; over ssh, a remote process ends when its output pipe closes). SIGINT/SIGTERM are
forwarded, so every process checkpoints and exits cleanly (preemption).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from llmx.cli import run as run_cli
from llmx.errors import ConfigError

_PR_SET_PDEATHSIG = 1
DEEPSPEED_DEFAULT_PORT = 29500
EXPORTED_PREFIXES = ("PYTHON", "LLMX_", "JAX_", "XLA_", "TF_CPP_", "NCCL_", "HF_")


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


def _simulated_devices(env: dict, devices_per_process: int) -> None:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])


def child_env(*, index: int, num_processes: int, port: int, devices_per_process: int | None) -> dict:
    env = dict(os.environ, LLMX_COORDINATOR=f"127.0.0.1:{port}", LLMX_NUM_PROCESSES=str(num_processes),
               LLMX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if devices_per_process:
        _simulated_devices(env, devices_per_process)
        first = index * devices_per_process  # GPU boxes: each process gets its own K GPUs
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(first + i) for i in range(devices_per_process)))
    return env


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile: `host slots=N` per line, blank lines and `#` comments ignored."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile {path} does not exist")
    hosts: dict[str, int] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = re.match(r"^(\S+)\s+slots=(\d+)", line)
            if not match:
                raise ConfigError(f"hostfile {path} line {number} is not 'host slots=N': {line!r}")
            host, slots = match.group(1), int(match.group(2))
            if host in hosts:
                raise ConfigError(f"hostfile {path} names {host} twice (line {number}); give each host one line")
            if slots < 1:
                raise ConfigError(f"hostfile {path} line {number}: {host} has slots={slots}; give at least 1")
            hosts[host] = slots
    if not hosts:
        raise ConfigError(f"hostfile {path} names no hosts; write one 'host slots=N' line per host")
    return hosts


def hostfile_commands(args: list[str], *, hosts: dict[str, int], ssh_command: str, master_port: int,
                      devices_per_process: int | None, module: str = "llmx.train") -> list[list[str]]:
    """One `ssh HOST 'cd DIR && exec env VARS python -u -m MODULE ARGS'` per slot, in rank order."""
    exported = {k: v for k, v in os.environ.items() if k.startswith(EXPORTED_PREFIXES)}
    world, master = sum(hosts.values()), next(iter(hosts))
    commands, rank = [], 0
    for host, slots in hosts.items():
        for local_rank in range(slots):
            env = dict(exported, MASTER_ADDR=master, MASTER_PORT=str(master_port), WORLD_SIZE=str(world),
                       RANK=str(rank), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(slots), PYTHONUNBUFFERED="1")
            if devices_per_process:
                _simulated_devices(env, devices_per_process)
            assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
            remote = (f"cd {shlex.quote(os.getcwd())} && exec env {assignments} "
                      f"{shlex.join([sys.executable, '-u', '-m', module, *args])}")
            commands.append([*shlex.split(ssh_command), host, remote])
            rank += 1
    return commands


def _start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent)


def launch(command: list[str], *, num_processes: int, devices_per_process: int | None, grace_s: float = 10.0) -> int:
    port = free_port()
    envs = [child_env(index=i, num_processes=num_processes, port=port, devices_per_process=devices_per_process)
            for i in range(num_processes)]
    return supervise([_start(command, env) for env in envs], grace_s=grace_s)


def supervise(procs: list[subprocess.Popen], *, grace_s: float = 10.0) -> int:
    """Forwards output and signals; stops every process as soon as one fails; the first failure's status."""
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
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--num-processes", type=int, help="local processes on 127.0.0.1")
    where.add_argument("--hostfile", help="DeepSpeed hostfile: one process per slot, started over ssh")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="simulated CPU devices per process (and CUDA_VISIBLE_DEVICES on GPU boxes)")
    parser.add_argument("--ssh-command", default=os.environ.get("LLMX_SSH_COMMAND", "ssh"),
                        help="how to run a command on a host: CMD HOST 'COMMAND' (default $LLMX_SSH_COMMAND or ssh)")
    parser.add_argument("--master-port", type=int, default=DEEPSPEED_DEFAULT_PORT,
                        help=f"coordinator port on the first host (default {DEEPSPEED_DEFAULT_PORT}, DeepSpeed's)")
    parser.add_argument("--module", default="llmx.train", help="the llmx entry point to run (default llmx.train)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the entry point's arguments")
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if args.hostfile:
        commands = hostfile_commands(rest, hosts=read_hostfile(args.hostfile), ssh_command=args.ssh_command,
                                     master_port=args.master_port, devices_per_process=args.devices_per_process,
                                     module=args.module)
        return supervise([_start(command, dict(os.environ)) for command in commands])
    if args.num_processes < 1:
        parser.error("--num-processes must be at least 1")
    return launch([sys.executable, "-m", args.module, *rest], num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
