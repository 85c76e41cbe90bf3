"""Checkpoints through an Orbax `CheckpointManager`: the train state, the data iterator's state, and
the resolved config, saved asynchronously and atomically (Orbax writes to a temporary directory and
renames it on completion, so an interrupted save never shadows the previous complete one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from llmx.config import CheckpointConfig
from llmx.errors import CheckpointError

log = logging.getLogger(__name__)


def _json_safe(tree: Any) -> Any:
    # Grain iterator states hold tuples; JSON gives lists back, which Grain accepts.
    return json.loads(json.dumps(tree))


def _single_host_array_writes() -> None:
    """Replica-parallel saving splits replicated shards among hosts; with one host it only adds a
    compiled slice per shard (dozens of tiny compilations per save on an 8-device CPU mesh)."""
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        _single_host_array_writes()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, *, data_state: dict, config_yaml: str) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_json_safe(data_state)),
            config=ocp.args.JsonSave({"yaml": config_yaml}),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data iterator state) at `step`, placed with the shardings in `abstract_state`
        (ShapeDtypeStructs with `.sharding`), whatever mesh the checkpoint was written on."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored into this model: {first_line}"
            ) from None
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) into these."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
