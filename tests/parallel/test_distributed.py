"""distributed.initialize's decisions, without starting a job (the job: test_multiprocess.py)."""

import pytest

from covenant_jax.parallel import distributed

SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="0", SLURM_LOCALID="0")


@pytest.mark.parametrize(
    "env, kind",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
        ({**SLURM, "SLURM_NTASKS": "4"}, "slurm"),
        ({**SLURM, "SLURM_NTASKS": "1"}, None),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "ompi"),
    ],
)
def test_cluster_detected(env, kind):
    assert distributed.cluster_detected(env) == kind


def test_single_process_is_a_no_op(monkeypatch):
    for k in (
        "COVENANT_COORDINATOR",
        "COVENANT_NUM_PROCESSES",
        "COVENANT_PROCESS_ID",
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
    ):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")
    distributed.abandon(1)  # single process: returns


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator="h:1", num_processes=2), "need all of"),
        (dict(num_processes=2, process_id=0), "need all of"),
        (dict(coordinator="host", num_processes=2, process_id=0), "expected HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"not in \[0, 2\)"),
        (
            dict(coordinator="h:1", num_processes=2, process_id=0, heartbeat_s=0),
            "--heartbeat-timeout 0: expected at least 1 second",
        ),
    ],
)
def test_bad_flags_are_user_errors(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_env_must_be_integers(monkeypatch):
    monkeypatch.setenv("COVENANT_NUM_PROCESSES", "two")
    with pytest.raises(distributed.DistributedError, match="COVENANT_NUM_PROCESSES='two'"):
        distributed.initialize()


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _rounds(watch, clock, seconds, values):
    for _ in range(seconds):
        clock.now += 1
        watch.observe({f"{distributed.PeerWatch.PREFIX}{p}": v for p, v in values().items()})


@pytest.mark.parametrize("peer_1, silent", [("counting", None), ("hung", 1), ("done", None)])
def test_peer_watch_names_a_silent_peer_after_the_timeout(monkeypatch, peer_1, silent):
    """Process 0 of 2 watching process 1 for 30 s (timeout 10 s): a peer whose counter stops is
    silent, one that wrote "done" (finished normally) never is."""
    clock = _Clock()
    monkeypatch.setattr(distributed.time, "monotonic", clock)
    watch = distributed.PeerWatch(client=None, me=0, count=2, timeout_s=10)
    beats = iter(range(1, 100))
    _rounds(watch, clock, 3, lambda: {0: "0", 1: str(next(beats))})
    later = {"counting": lambda: str(next(beats)), "hung": lambda: "3", "done": lambda: "done"}[peer_1]
    _rounds(watch, clock, 10, lambda: {1: later()})
    assert watch.silent_peer() is None  # 10 s at most: not yet past the timeout
    _rounds(watch, clock, 20, lambda: {1: later()})
    assert watch.silent_peer() == silent


def test_peer_watch_names_the_coordinator_when_the_store_does_not_answer(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(distributed.time, "monotonic", clock)
    watch = distributed.PeerWatch(client=None, me=1, count=3, timeout_s=10)
    _rounds(watch, clock, 5, lambda: {0: str(clock.now), 2: str(clock.now)})
    clock.now += 10.5  # no round completes: the key-value store (process 0's service) is silent
    assert watch.silent_peer() == 0
