"""Several processes as one program: `jax.distributed` initialisation and the few host-side exchanges
the trainer needs.

Initialise when the environment says there are several processes:
- explicit: `LLMX_COORDINATOR` (host:port), `LLMX_NUM_PROCESSES`, `LLMX_PROCESS_ID` (what `llmx.launch`
  sets), or the same given as arguments;
- torchrun and DeepSpeed's launcher: `RANK`, `WORLD_SIZE` > 1, `MASTER_ADDR`, `MASTER_PORT`, and
  `LOCAL_RANK` with `LOCAL_WORLD_SIZE` (torchrun) or `LOCAL_SIZE` (DeepSpeed): with several processes
  on a host, each takes the one accelerator at its local rank, as torch's convention has it;
- otherwise JAX's own cluster detection (`detect_cluster`: a Cloud TPU VM slice from its metadata, a
  TPU slice on GKE, SLURM, Open MPI, Kubernetes), which fills in coordinator and ranks; the cluster found
  is printed;
otherwise run as a single process. Joining has a timeout (`LLMX_INIT_TIMEOUT`, seconds): a wrong
coordinator address or a missing peer becomes a one-line error, not a hang.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

import jax
import numpy as np
from jax._src import clusters as jax_clusters

from llmx.errors import LlmxError

log = logging.getLogger(__name__)


class DistributedError(LlmxError):
    """Processes that could not join each other."""


# JAX's own cluster environments (jax._src.clusters: Cloud TPU VM and GKE TPU slices, SLURM, Open MPI,
# Kubernetes), the ones `jax.distributed.initialize()` auto-detects. JAX exposes the detection only inside
# initialize, which must not be called where there is no cluster, so llmx asks the same classes first.
CLUSTER_NAMES = {"GceTpuCluster": "Cloud TPU VM slice", "GkeTpuCluster": "TPU slice on GKE",
                 "SlurmCluster": "SLURM", "OmpiCluster": "Open MPI", "K8sCluster": "Kubernetes"}


def detect_cluster() -> tuple[str, int] | None:
    """(the cluster's name, its process count) by JAX's cluster detection, or None outside one."""
    for env in jax_clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        try:
            count = int(env.get_process_count())
        except Exception as e:  # an environment that looks present but is incomplete: JAX would fail too
            log.warning("%s detected but incomplete (%s): running as one process", env.__name__, e)
            return None
        return CLUSTER_NAMES.get(env.__name__, env.__name__), count
    return None


def launcher_env(environ=os.environ) -> dict | None:
    """torchrun / DeepSpeed-launcher variables -> coordinator, num_processes, process_id, local_device_ids;
    None when they do not describe several processes."""
    world = environ.get("WORLD_SIZE", "")
    if not (world.isdigit() and int(world) > 1 and environ.get("RANK", "").isdigit()):
        return None
    port = int(environ.get("MASTER_PORT", "29500"))
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        port += 1  # torchrun's agent serves its own TCP store on MASTER_PORT: JAX's coordinator takes the next
    local_size = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    return {
        "coordinator": f"{environ.get('MASTER_ADDR', '127.0.0.1')}:{port}",
        "num_processes": int(world),
        "process_id": int(environ["RANK"]),
        "local_device_ids": [local_rank] if local_size > 1 else None,
    }


def _rendezvous(coordinator: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Meet every process over plain TCP on the coordinator's port before JAX does.

    JAX's coordination client aborts the whole process (a C++ fatal error) when the coordinator cannot
    be reached or a peer never registers; checking first turns both into a readable error after the
    timeout. Process 0 listens, the others connect and say who they are, process 0 answers "go" once
    all have come; then the port is released for JAX's coordination service."""
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        with socket.create_server((host, int(port)), reuse_port=False) as server:
            server.settimeout(1.0)
            peers: dict[int, socket.socket] = {}
            while len(peers) < num_processes - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, num_processes)) - set(peers))
                    raise DistributedError(
                        f"process 0 waited {timeout_s:.0f} s at {coordinator} for {num_processes} processes; "
                        f"missing: {', '.join(map(str, missing))}"
                    )
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(max(deadline - time.monotonic(), 1.0))
                peers[int(conn.recv(16).decode() or -1)] = conn
            for conn in peers.values():
                conn.sendall(b"go")
                conn.close()
        return
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0) as conn:
                conn.sendall(str(process_id).encode())
                conn.settimeout(max(deadline - time.monotonic(), 1.0))
                if conn.recv(2) == b"go":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DistributedError(
                f"process {process_id} could not join {num_processes} processes at coordinator {coordinator} "
                f"within {timeout_s:.0f} s: no answer from process 0 there"
            )
        time.sleep(0.5)


def initialize(
    *, coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    timeout_s: int | None = None,
) -> bool:
    """Joins the other processes if there are any; True when running as several processes."""
    coordinator = coordinator or os.environ.get("LLMX_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("LLMX_NUM_PROCESSES", "0") or 0)
    if process_id is None and os.environ.get("LLMX_PROCESS_ID"):
        process_id = int(os.environ["LLMX_PROCESS_ID"])
    timeout_s = timeout_s or int(os.environ.get("LLMX_INIT_TIMEOUT", "300"))
    local_device_ids = None
    if coordinator is None and (launched := launcher_env()) is not None:
        coordinator, num_processes, process_id = launched["coordinator"], launched["num_processes"], launched["process_id"]
        local_device_ids = launched["local_device_ids"]
    explicit = coordinator is not None and (num_processes or 0) > 1
    cluster = None if explicit else detect_cluster()
    if not explicit and (cluster is None or cluster[1] <= 1):
        return False
    if cluster is not None:
        print(f"llmx.distributed: {cluster[0]} detected: {cluster[1]} processes, coordinator and ranks from JAX's "
              "cluster detection", file=sys.stderr, flush=True)
    kwargs = {}
    if explicit:
        _rendezvous(coordinator, num_processes, process_id, timeout_s)
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                      local_device_ids=local_device_ids)
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as e:  # the coordination service reports failures as assorted runtime errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"coordinator {coordinator}" if explicit else "the cluster's coordinator"
        raise DistributedError(
            f"process {process_id} could not join {num_processes or '?'} processes at {where} within {timeout_s} s: "
            f"{first[:300]}"
        ) from None
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # logs and metrics come from process 0
    log.info("joined %d processes; %d local of %d devices", jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (one all-gather of padded bytes)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, sizes)]


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (one all-gather of one int): a decision they all share."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.array([value], np.int32)).max())


def global_data_state(local_state: dict) -> dict:
    """The data pipeline's global state: the union of every process's row streams (llmx.data.pipeline)."""
    from llmx.data.pipeline import state_from_json, state_to_json

    rows: dict = {}
    for state in gather_json(state_to_json(local_state)):
        rows.update(state_from_json(state).get("rows", {}))
    return {"rows": rows}


def first_process_first(fn):
    """`fn()` on process 0, then on the others: for work that writes shared files (preparing a dataset,
    training a tokenizer) that the others then only read."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("llmx: process 0 done first")
    return result if jax.process_index() == 0 else fn()
