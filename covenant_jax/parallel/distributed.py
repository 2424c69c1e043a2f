"""Several JAX processes (hosts) as one job: ``jax.distributed.initialize`` with a timeout.

Call :func:`initialize` once per process, before anything touches a JAX backend (the CLI does
it before running a verb). Three ways in:

* explicit: ``initialize("10.0.0.1:1234", num_processes=4, process_id=i)`` (or the CLI's
  ``--coordinator/--num-processes/--process-id``, or ``COVENANT_COORDINATOR``,
  ``COVENANT_NUM_PROCESSES``, ``COVENANT_PROCESS_ID``);
* automatic: with no arguments, when the environment says this is one process of a cluster
  (TPU pod worker variables, a SLURM job step with several tasks, Open MPI, or
  ``JAX_COORDINATOR_ADDRESS``), JAX's own cluster detection fills everything in;
* otherwise nothing happens and the run is single-process.

On CPU the cross-process collectives go through gloo. ``timeout_s`` bounds the wait for every
peer to connect, so a missing process is a :class:`DistributedError` naming the coordinator,
not a hang; :func:`barrier` is a named rendezvous with a timeout (coordination service, no
device work). Once joined, a :class:`PeerWatch` ends this process with one line when a peer
goes silent (dead or hung) for the heartbeat timeout.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Mapping

from covenant_jax.errors import DistributedError

ENV_COORDINATOR = "COVENANT_COORDINATOR"
ENV_NUM_PROCESSES = "COVENANT_NUM_PROCESSES"
ENV_PROCESS_ID = "COVENANT_PROCESS_ID"
ENV_TIMEOUT = "COVENANT_INIT_TIMEOUT"
ENV_HEARTBEAT = "COVENANT_HEARTBEAT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_S = 100  # JAX's own default
# JAX's deadlines are ours + this, so our watchdogs speak first (its own end is a LOG(FATAL)).
RUNTIME_GRACE_S = 60
EXIT_NO_PEER = 2  # the CLI's bad-input code
EXIT_PEER_LOST = 1
# The end of the one line a survivor prints, whether its peer died or hung.
PEER_LOST = "has probably died or hung. Completed checkpoints are intact: restart every process to resume."


def cluster_detected(env: Mapping[str, str] | None = None) -> str | None:
    """The kind of multi-process cluster the environment describes, or None."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"] or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int | None = None,
    heartbeat_s: int | None = None,
) -> bool:
    """Joins this process to the job; returns False (and does nothing) for a single process.

    Arguments left None come from the COVENANT_* variables, then from cluster detection.
    Idempotent: a second call after a successful one is a no-op. If the peers have not all
    connected after ``timeout_s``, the process exits (code 2) with a message on stderr: the
    runtime's blocking connect cannot be interrupted, so there is no exception to raise.
    ``heartbeat_s``: after start-up, how long a silent (dead or hung) peer may go before the
    others exit with a message naming it (default 100 s, JAX's; see :class:`PeerWatch`).
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    timeout_s = int(timeout_s if timeout_s is not None else (_env_int(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S))
    heartbeat_s = int(
        heartbeat_s if heartbeat_s is not None else (_env_int(ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_S)
    )
    explicit = (coordinator, num_processes, process_id)
    if all(x is None for x in explicit):
        if cluster_detected() is None:
            return False  # one process; nothing to join
    elif num_processes == 1 and coordinator is None:
        return False
    elif coordinator is None or num_processes is None or process_id is None:
        raise DistributedError(
            "multi-process runs need all of --coordinator HOST:PORT, --num-processes N and "
            f"--process-id I (got coordinator={coordinator}, num_processes={num_processes}, "
            f"process_id={process_id})"
        )
    else:
        if ":" not in coordinator:
            raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes})")

    if heartbeat_s < 1:
        raise DistributedError(f"--heartbeat-timeout {heartbeat_s}: expected at least 1 second")

    # CPU collectives across processes (JAX 0.10 defaults to gloo; older versions to none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or f"auto ({cluster_detected()})"
    who = "this process" if process_id is None else f"process {process_id} of {num_processes}"
    message = (
        f"covenant-jax: error: {who} could not join the job at coordinator {where} within "
        f"{timeout_s}s: a peer never connected (or the coordinator is unreachable). Start "
        f"every process with the same --coordinator and --num-processes, each with its "
        f"own --process-id; raise the limit with --init-timeout."
    )
    # The runtime aborts the process (C++ LOG(FATAL)) when its own connect deadline passes, and
    # the blocked connect cannot be interrupted from Python. So JAX gets a longer deadline and a
    # watchdog ends the process at ours with a readable message and the bad-input exit code.
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(EXIT_NO_PEER)

    threading.Thread(target=watchdog, name="covenant-distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout_s + RUNTIME_GRACE_S,
            heartbeat_timeout_seconds=heartbeat_s + RUNTIME_GRACE_S,
        )
    except Exception as e:  # called after JAX computation, cluster detection failures, ...
        raise DistributedError(
            f"{who}: jax.distributed.initialize (coordinator {where}) failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        done.set()
    PeerWatch.start(heartbeat_s)
    return True


class PeerWatch:
    """Ends this process, with one line naming the peer, when a peer has been silent for the
    heartbeat timeout: dead, or hung (SIGSTOP, a wedged host) with its sockets still open.

    JAX's coordination service notices the same silence but then aborts every survivor with a
    C++ LOG(FATAL) and a stack dump, and offers no Python hook (``jax.distributed.initialize``
    does not pass its client a ``missed_heartbeat_callback``). So each process writes a counter
    to the service's key-value store every ``interval_s`` and reads everyone's with one
    directory read; JAX's own heartbeat gets ``RUNTIME_GRACE_S`` more, so this speaks first. A
    second thread judges, so a key-value call that blocks (the coordinator itself hung) cannot
    stall the verdict. A process that exits normally writes "done", which is never silence.
    """

    PREFIX = "covenant/alive/"
    DONE = "done"
    running: "PeerWatch | None" = None  # this process's, once joined

    def __init__(self, client, me: int, count: int, timeout_s: float):
        self.client, self.me, self.timeout_s = client, me, timeout_s
        self.interval_s = min(max(timeout_s / 10, 0.5), 5.0)
        now = time.monotonic()
        self.heard = {p: now for p in range(count) if p != me}  # when its counter last moved
        self.values: dict[int, str] = {}
        self.round_at = now  # when this process last reached the coordinator
        self.stopped = threading.Event()
        self.writing = threading.Lock()  # no counter may land after "done"

    @classmethod
    def start(cls, timeout_s: float) -> "PeerWatch":
        from jax._src import distributed as jax_distributed

        state = jax_distributed.global_state
        watch = cls(state.client, state.process_id, state.num_processes, timeout_s)
        threading.Thread(target=watch._beat, name="covenant-peer-beat", daemon=True).start()
        threading.Thread(target=watch._judge, name="covenant-peer-watch", daemon=True).start()
        atexit.register(watch.stop)  # after jax's own atexit was registered: runs before it
        cls.running = watch
        return watch

    def _beat(self) -> None:
        beat = 0
        while not self.stopped.wait(self.interval_s):
            beat += 1
            try:
                with self.writing:
                    if self.stopped.is_set():
                        return
                    self.client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), allow_overwrite=True)
                self.observe(dict(self.client.key_value_dir_get(self.PREFIX)))
            except Exception:  # the service is unreachable: round_at goes stale, _judge decides
                continue

    def observe(self, values: Mapping[str, str]) -> None:
        """One round's key-value directory: a peer whose counter moved (or that is done) was heard."""
        now = time.monotonic()
        for peer in self.heard:
            value = values.get(f"{self.PREFIX}{peer}")
            if value is not None and (value != self.values.get(peer) or value == self.DONE):
                self.values[peer], self.heard[peer] = value, now
        self.round_at = now

    def silent_peer(self) -> int | None:
        """A process not heard from for the timeout (0, the coordinator's host, when the key-value
        store itself has not answered), or None."""
        now = time.monotonic()
        if now - self.round_at > self.timeout_s:
            return 0
        return next((p for p, t in self.heard.items() if now - t > self.timeout_s), None)

    def _judge(self) -> None:
        while not self.stopped.wait(self.interval_s):
            peer = self.silent_peer()
            if peer is not None and not self.stopped.is_set():
                sys.stdout.flush()
                sys.stderr.write(
                    f"covenant-jax: error: process {self.me}: process {peer} has not "
                    f"responded for {self.timeout_s:g} s; it {PEER_LOST}\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_PEER_LOST)

    def stop(self) -> None:
        """This process is done: peers stop watching it (before JAX's shutdown barrier)."""
        if self.stopped.is_set():
            return
        locked = self.writing.acquire(timeout=2 * self.interval_s)  # a blocked write: go on anyway
        self.stopped.set()
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.me}", self.DONE, allow_overwrite=True)
        except Exception:
            pass  # the service is gone: the peers are ending too
        finally:
            if locked:
                self.writing.release()


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Waits until every process reaches ``name`` (at most ``timeout_s``); no-op single-process."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise DistributedError("barrier() needs jax.distributed to be initialised")
    try:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:
        raise DistributedError(
            f"process {jax.process_index()}: barrier {name!r} timed out after {timeout_s}s "
            f"waiting for the other processes ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def is_multiprocess() -> bool:
    """True in a joined job of several processes (without touching JAX when it is not loaded)."""
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def abandon(code: int) -> None:
    """A failed process of a multi-process job exits now, with ``code``; no-op single-process.

    A normal exit runs JAX's shutdown barrier, which waits (up to 5 minutes) for every peer, and
    the peers may themselves be blocked in a collective with this process. Exiting at once
    closes its connections, so the peers' collectives fail too (gloo: at once; elsewhere the
    coordination service's heartbeat ends them)."""
    if is_multiprocess():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
