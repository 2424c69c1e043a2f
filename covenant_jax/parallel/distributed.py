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
device work).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Mapping

from covenant_jax.errors import UserError

ENV_COORDINATOR = "COVENANT_COORDINATOR"
ENV_NUM_PROCESSES = "COVENANT_NUM_PROCESSES"
ENV_PROCESS_ID = "COVENANT_PROCESS_ID"
ENV_TIMEOUT = "COVENANT_INIT_TIMEOUT"
ENV_HEARTBEAT = "COVENANT_HEARTBEAT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
EXIT_NO_PEER = 2  # the CLI's bad-input code


class DistributedError(UserError):
    """The processes of a multi-process job could not find each other in time."""


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


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int | None = None,
               heartbeat_s: int | None = None) -> bool:
    """Joins this process to the job; returns False (and does nothing) for a single process.

    Arguments left None come from the COVENANT_* variables, then from cluster detection.
    Idempotent: a second call after a successful one is a no-op. If the peers have not all
    connected after ``timeout_s``, the process exits (code 2) with a message on stderr: the
    runtime's blocking connect cannot be interrupted, so there is no exception to raise.
    ``heartbeat_s``: after start-up, how long a silent peer may go before the survivors are
    terminated by the runtime (JAX's default: 100 s).
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    timeout_s = int(timeout_s if timeout_s is not None else (_env_int(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S))
    heartbeat_s = heartbeat_s if heartbeat_s is not None else _env_int(ENV_HEARTBEAT)
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
            f"process_id={process_id})")
    else:
        if ":" not in coordinator:
            raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes})")

    # CPU collectives across processes (JAX 0.10 defaults to gloo; older versions to none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or f"auto ({cluster_detected()})"
    who = "this process" if process_id is None else f"process {process_id} of {num_processes}"
    message = (f"covenant-jax: error: {who} could not join the job at coordinator {where} within "
               f"{timeout_s}s: a peer never connected (or the coordinator is unreachable). Start "
               f"every process with the same --coordinator and --num-processes, each with its "
               f"own --process-id; raise the limit with --init-timeout.")
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
    kwargs = {} if heartbeat_s is None else {"heartbeat_timeout_seconds": int(heartbeat_s)}
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=timeout_s + 60, **kwargs)
    except Exception as e:  # called after JAX computation, cluster detection failures, ...
        raise DistributedError(f"{who}: jax.distributed.initialize (coordinator {where}) failed: "
                               f"{type(e).__name__}: {e}") from e
    finally:
        done.set()
    return True


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
            f"waiting for the other processes ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def shutdown() -> None:
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


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
