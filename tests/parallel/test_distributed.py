"""distributed.initialize's decisions, without starting a job (the job: test_multiprocess.py)."""

import pytest

from covenant_jax.parallel import distributed

SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="0", SLURM_LOCALID="0")


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({**SLURM, "SLURM_NTASKS": "4"}, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "ompi"),
])
def test_cluster_detected(env, kind):
    assert distributed.cluster_detected(env) == kind


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("COVENANT_COORDINATOR", "COVENANT_NUM_PROCESSES", "COVENANT_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")
    distributed.abandon(1)  # single process: returns


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="h:1", num_processes=2), "need all of"),
    (dict(num_processes=2, process_id=0), "need all of"),
    (dict(coordinator="host", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), r"not in \[0, 2\)"),
])
def test_bad_flags_are_user_errors(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_env_must_be_integers(monkeypatch):
    monkeypatch.setenv("COVENANT_NUM_PROCESSES", "two")
    with pytest.raises(distributed.DistributedError, match="COVENANT_NUM_PROCESSES='two'"):
        distributed.initialize()
