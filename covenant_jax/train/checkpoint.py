"""Run checkpoints through Orbax's CheckpointManager: train state, data-iterator state, config.

Async (training continues while arrays are written), keep-N, and atomic: Orbax writes each step
into a temporary folder and renames it when complete, so a kill at any moment leaves the last
finished checkpoint intact. The Grain iterator state is saved with the same step, so a resumed
run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from covenant_jax import storage
from covenant_jax.convert.hf_files import CheckpointError


class RunCheckpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self.directory = storage.path(directory)  # local or gs://: Orbax takes epath paths
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config),
        ))

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state onto the abstract target's shardings and the iterator in place."""
        # Grain keeps one iterator-state file per process: a different process count cannot resume.
        data_dir = self.directory / str(step) / "data"
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data_dir.is_dir() and not (data_dir / mine).is_file():
            found = sorted(p.name for p in data_dir.glob("process_*.json"))
            raise CheckpointError(
                f"{self.directory / str(step)} was written by a different number of processes "
                f"(data iterator states {found}); this run has {jax.process_count()}: resume with "
                f"the same process count, or train into a new run_dir")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored.state

    def read_state(self, step: int) -> Any:
        """The saved state as stored (no target shardings): for inspection and tests."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
