"""Where trials run: this machine's processes (`local`) or Ray actors (`ray`).

Both give the driver the same handle: `poll() -> (new metric records, exit status or None)`,
`stop(graceful=)`, `error_line()`. The Ray backend places each trial as an actor that asks Ray for the
trial's devices (`num_gpus`, the `TPU` resource, or a CPU) and runs the same `TrialProcess` inside it,
so the trial's process group, log and metrics live on the node Ray picked; the driver keeps Optuna's
ask/tell and reads the metrics through the actor (Ray Tune's reporting API changes too often to build
on). On a multi-node cluster the sweep directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmx.errors import ConfigError
from llmx.sweep.devices import Devices
from llmx.sweep.trial import TrialProcess


class LocalBackend:
    """Trials as child processes of the sweep, one device subset (an environment overlay) per slot."""

    def __init__(self, slots: list[dict]):
        self.slots = slots
        self.capacity = len(slots)

    def launch(self, trial_dir: Path, slot: int) -> TrialProcess:
        return TrialProcess(trial_dir, env_overlay=self.slots[slot])

    def close(self) -> None:
        pass


def import_ray():
    """The `ray` module, or a one-line error naming the extra (imported only when this backend is chosen)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sweep.backend=ray needs the ray extra: pip install -e '.[ray]'") from None
    return ray


class _RayTrial:
    """The driver's view of a trial actor: the same calls as a TrialProcess, through Ray."""

    def __init__(self, ray, actor):
        self._ray, self.actor = ray, actor

    def poll(self):
        return self._ray.get(self.actor.poll.remote())

    def error_line(self) -> str:
        return self._ray.get(self.actor.error_line.remote())

    def stop(self, *, graceful: bool) -> int:
        code = self._ray.get(self.actor.stop.remote(graceful=graceful))
        self._ray.kill(self.actor)
        return code


class RayBackend:
    """Each trial a Ray actor holding `per_trial` devices of `devices.platform`.

    `address`: "" starts an in-process Ray on this machine (its CPUs limited to `parallel`, so Ray runs
    exactly that many trials at once); "auto" or "host:port" joins the user's cluster."""

    def __init__(self, *, devices: Devices, per_trial: int, parallel: int, address: str, env_overlay: dict):
        self._ray = ray = import_ray()
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=parallel, num_gpus=len(devices.ids) if devices.platform == "gpu" else 0,
                         include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
        options = {"num_cpus": 1}
        if devices.platform == "gpu":
            options["num_gpus"] = per_trial  # Ray sets CUDA_VISIBLE_DEVICES for the actor
        elif devices.platform == "tpu":
            options["resources"] = {"TPU": per_trial}  # Ray sets TPU_VISIBLE_CHIPS and the chip bounds
        self._actor_class = ray.remote(**options)(TrialProcess)
        self._env = {**env_overlay, "PYTHONPATH": os.pathsep.join(filter(None, [
            str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))}
        self._cwd = os.getcwd()
        self.capacity = parallel

    def launch(self, trial_dir: Path, slot: int) -> _RayTrial:
        actor = self._actor_class.remote(Path(trial_dir).resolve(), env_overlay=self._env, cwd=self._cwd)
        return _RayTrial(self._ray, actor)

    def close(self) -> None:
        self._ray.shutdown()
