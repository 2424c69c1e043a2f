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
import orbax.checkpoint as ocp


class RunCheckpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("state", "data", "config"),
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
