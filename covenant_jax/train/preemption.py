"""Stopping a run cleanly: SIGTERM or SIGINT saves a checkpoint at a step all processes agree on.

Preemption (Cloud TPU maintenance and spot reclaim, SLURM ``scancel``, Kubernetes, ``kill``)
arrives as SIGTERM with a grace period. The handler only records the signal; the loop asks
:meth:`StopRequest.agreed` after each step, saves that step, waits for the save and exits with
:data:`EXIT_PREEMPTED`. A second SIGINT stops at once (the last complete checkpoint stays).

Multi-process runs must all stop after the same step. When JAX's distributed runtime is up,
its preemption service (``jax.experimental.multihost_utils.reached_preemption_sync_point``,
the mechanism Orbax uses) catches SIGTERM in C++, tells the coordinator, and all processes get
``True`` at the same step; a SIGINT is handed to it by re-raising it as SIGTERM. JAX exposes no
other maintenance notice (Cloud TPU's maintenance events reach the VM as SIGTERM). Without that
service, every process's flag is all-gathered at each step (one tiny collective).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; rerun to resume


def _jax_preemption_service() -> bool:
    """Whether jax.distributed runs its preemption sync manager (it then owns SIGTERM)."""
    try:
        from jax._src import distributed

        state = distributed.global_state
        return state.client is not None and state.preemption_sync_manager is not None
    except (ImportError, AttributeError):  # a JAX without it: our own handler and all-gather
        return False


class StopRequest:
    """Context manager around the loop; restores the previous signal handlers on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._jax_service = _jax_preemption_service()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        # SIGTERM is JAX's to catch when its preemption service runs.
        for signum in (signal.SIGINT,) if self._jax_service else (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.signal_name = signal.Signals(signum).name
        # os.write: a print here could re-enter a print the main thread was in.
        os.write(
            2,
            f"covenant-jax: {self.signal_name} received: saving a checkpoint after the "
            "current step, then stopping (Ctrl-C again stops at once)\n".encode(),
        )
        if self._jax_service and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)  # JAX's notifier passes it to every process

    def agreed(self, step: int) -> bool:
        """True, on every process at the same ``step``, once any process was asked to stop."""
        if self._jax_service:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.signal_name is not None
        from jax.experimental import multihost_utils

        return bool(
            np.asarray(multihost_utils.process_allgather(np.int32(self.signal_name is not None))).any()
        )

    def describe(self) -> str:
        return self.signal_name or "a preemption notice (SIGTERM)"
