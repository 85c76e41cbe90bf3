"""llmx.distributed falls back to JAX's own cluster detection (SLURM, Open MPI, TPU VMs, Kubernetes)."""

from llmx import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


def test_no_cluster_here_runs_as_one_process(monkeypatch):
    for var in [*SLURM, "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES"]:
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect_cluster() is None
    assert distributed.initialize() is False


def test_slurm_and_open_mpi_are_detected_by_jax(monkeypatch):
    for var, value in SLURM.items():
        monkeypatch.setenv(var, value)
    assert distributed.detect_cluster() == ("SLURM", 2)
    for var in SLURM:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.detect_cluster() == ("Open MPI", 4)
