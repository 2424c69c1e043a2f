"""Two JAX processes on this machine (gloo, 4 fake CPU devices each) == one process with 8.

The job goes through the CLI with the distributed flags: hf-to-jax, jax-to-hf, train 3 steps
(checkpoint), then train again: resume to 6 steps and export. The reference is this
pytest process (8 devices) on the same recipe. Each process packs its own share of the rows,
so the reference is fed the same global batches: two virtual process shards joined row-wise
(process 0's rows first, as the 2-process mesh places them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.parallel import common as mp_common
from tests.train import common

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVENANT_", "XLA_FLAGS"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


def _run_job(calls: list[list[str]], log_dir: Path, n: int = 2, timeout: float = 480) -> None:
    """Every process runs the CLI calls in order (with --coordinator/--num-processes/--process-id).

    No persistent compilation cache: with one, the resumed run's process 0 loaded its programs
    while process 1 compiled again (20 s of CPU against 5), and gloo's rendezvous at the first
    collective gives up after 30 s, which that skew exceeds on a loaded 2-core machine."""
    env = _env(4)
    port = _free_port()
    procs = []
    for i in range(n):
        flags = [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(n),
            "--process-id",
            str(i),
            "--init-timeout",
            "60",
        ]
        log = open(log_dir / f"proc{i}-{port}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps([flags + c for c in calls])],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p, _ in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # one failed: do not wait for the others to hang
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    codes = [p.returncode for p, _ in procs]
    if codes != [0] * n:
        tails = "\n".join(
            f"--- process {i} (rc {c}):\n" + "".join(open(log.name).readlines()[-30:])
            for i, ((_, log), c) in enumerate(zip(procs, codes))
        )
        pytest.fail(f"multi-process job failed {codes}:\n{tails}")


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # float32 models only: numpy has no bfloat16

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


class _JoinedIterator:
    """Batches of several virtual processes' iterators, rows concatenated in process order."""

    def __init__(self, iterators, shape):
        self.iterators, self.shape = iterators, shape

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(it, None) for it in self.iterators]
        present = [b for b in batches if b is not None]
        if not present:
            raise StopIteration
        padding = self._padding({k: v.dtype for k, v in present[0].items()})
        batches = [padding if b is None else b for b in batches]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def _padding(self, fields: dict) -> dict:
        """What a virtual process whose share ended feeds: padding with the batch's fields (a
        DPO batch has the pair fields)."""
        from covenant_jax.train import program

        return program.padding_batch(*self.shape, fields)

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        for it, s in zip(self.iterators, json.loads(state)):
            it.set_state(s)

    def start_prefetch(self) -> None:
        pass


class _Joined:
    def __init__(self, datasets, shape):
        self.datasets, self.shape = datasets, shape

    def __iter__(self):
        return _JoinedIterator([iter(d) for d in self.datasets], self.shape)


def _two_virtual_processes(monkeypatch):
    """The loop's pipeline, as two processes' shards joined; ``annotate`` (DPO's precomputed
    reference) runs on each virtual process's pairs, in this one process."""
    from covenant_jax.data import pipeline
    from covenant_jax.train import loop

    real = pipeline.build_pipeline

    def build(cfg, tokenizer, annotate=None, **_):
        shards = [real(cfg, tokenizer, process_index=i, process_count=2, annotate=annotate) for i in range(2)]
        shape = (shards[0].rows_per_process, shards[0].seq_len, shards[0].pad_id)
        return pipeline.DataPipeline(
            _Joined([s.train for s in shards], shape),
            _Joined([s.eval for s in shards], shape) if shards[0].eval is not None else None,
            shards[0].report,
            2 * shards[0].rows_per_process,
            shards[0].seq_len,
            shards[0].pad_id,
            pairs=shards[0].pairs,
        )

    monkeypatch.setattr(loop.data_pipeline, "build_pipeline", build)


RECIPE = """
import sys
sys.path.insert(0, {repo!r})
from tests.parallel.common import {maker} as recipe


def get_config():
    return recipe({root!r}, {model!r}, {data!r})
"""


def test_two_processes_equal_one(tmp_path, monkeypatch):
    from covenant_jax.convert.api import hf_to_jax, jax_to_hf
    from covenant_jax.train import loop

    hf = common.tiny_model_dir(tmp_path)
    data = common.chat_jsonl(tmp_path)
    mp, ref = tmp_path / "mp", tmp_path / "ref"
    mp.mkdir()
    recipe = mp / "recipe.py"
    recipe.write_text(
        RECIPE.format(maker="recipe", repo=str(REPO), root=str(mp), model=str(mp / "conv"), data=str(data))
    )

    # 2 processes: convert both ways, train 3 steps (checkpoint at 3), then a second `train`
    # resumes from that checkpoint (a new CheckpointManager reading the folder) to 6 steps and
    # exports. (Fresh processes would only add start-up time: the resume reads everything
    # from disk either way.)
    _run_job(
        [
            ["convert", "hf-to-jax", str(hf), str(mp / "conv")],
            ["convert", "jax-to-hf", str(mp / "conv"), str(mp / "roundtrip")],
            ["train", str(recipe), "--config.train.steps=3"],
            ["train", str(recipe), "--config.train.export=True"],
        ],
        tmp_path,
    )

    # Conversion: the round trip is bit-identical to the source, so is the 1-process one.
    source = _tensors(hf)
    for name, folder in [("2-process", mp / "roundtrip"), ("1-process", None)]:
        if folder is None:
            folder = jax_to_hf(hf_to_jax(hf, ref / "conv"), ref / "roundtrip")
        got = _tensors(folder)
        assert got.keys() == source.keys(), name
        for k in source:
            assert got[k].dtype == source[k].dtype and np.array_equal(got[k], source[k]), (name, k)

    # Training: same recipe, same global batches, one process with 8 devices, uninterrupted
    # (tests/train/test_loop.py shows resumed == uninterrupted in one process).
    _two_virtual_processes(monkeypatch)
    loop.train(mp_common.recipe(ref, ref / "conv", data, export=True))

    got, want = _metrics(mp / "run"), _metrics(ref / "run")
    assert sorted(got) == sorted(want) == list(range(7))  # eval at 0, train steps 1..6
    for step in want:
        for key in ("loss", "grad_norm", "eval_loss", "lr"):
            if key in want[step]:
                np.testing.assert_allclose(
                    got[step][key], want[step][key], rtol=2e-5, atol=1e-6, err_msg=f"{key} at step {step}"
                )
    assert {3, 6} <= {int(p.name) for p in (mp / "run" / "checkpoints").iterdir() if p.name.isdigit()}
    assert sorted(p.name for p in (mp / "run" / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    exported, reference = _tensors(mp / "run" / "export"), _tensors(ref / "run" / "export")
    assert exported.keys() == reference.keys() == source.keys()
    for k in reference:
        np.testing.assert_allclose(exported[k], reference[k], rtol=1e-5, atol=2e-6, err_msg=k)
    assert not np.array_equal(exported["model.norm.weight"], source["model.norm.weight"])  # trained
    assert (mp / "run" / "export" / "tokenizer.json").is_file()
    assert not list(mp.glob(".*.partial"))

    # A 2-process checkpoint does not resume in 1 process: a clear error, not Grain's.
    from covenant_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="different number of processes"):
        loop.train(mp_common.recipe(mp, mp / "conv", data, steps=9))


REFERENCES = {"in_step": [], "precomputed": ["--config.dpo.precompute_ref_log_probs=True"]}


def _assert_dpo_metrics_close(got: dict, want: dict, prefix: str, where: str) -> None:
    """One step's DPO metrics (``prefix`` "eval_": its eval's). rewards/accuracies counts pairs
    whose chosen reward exceeds the rejected one: while the policy is still the reference both
    rewards are 0 up to rounding (a precomputed reference's forward packs the pairs otherwise
    than the step), so it is compared once the rewards have moved (TRL counts the same way)."""
    from covenant_jax.train import preference

    for key in ("loss", "grad_norm", *preference.METRICS):
        key = prefix + key
        if key not in want:
            continue
        if key.endswith("accuracies") and abs(want[prefix + "rewards/margins"]) < 1e-3:
            continue
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-6, err_msg=f"{key}: {where}")


def test_two_processes_equal_one_dpo(tmp_path, monkeypatch):
    """DPO, 4 steps, in the same two processes: with the reference in the step, then with its
    log-probs precomputed (each process scores its share of the pairs; the shares all-gathered)
    == one process on the same global batches: losses, rewards, eval metrics, exported weights.
    The precomputed run started again (restored at its last step) reads the log-probs from the
    cache process 0 wrote, in both processes (the pass is collective: either both run it or
    neither)."""
    from covenant_jax.train import loop

    model, data = common.tiny_model_dir(tmp_path), common.pairs_jsonl(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    recipe = mp / "recipe.py"
    recipe.write_text(
        RECIPE.format(maker="dpo_recipe", repo=str(REPO), root=str(mp), model=str(model), data=str(data))
    )
    calls = [
        ["train", str(recipe), f"--config.train.run_dir={mp / name}", "--config.train.export=True", *flags]
        for name, flags in REFERENCES.items()
    ]
    _run_job([*calls, calls[-1]], tmp_path)  # the precomputed run started again: read from the cache
    cached = list((mp / "precomputed" / "data_cache").glob("ref_logp-*.npz"))
    assert len(cached) == 1, cached  # process 0 wrote it
    log = next(tmp_path.glob("proc0-*.log")).read_text()
    assert log.count("reference log-probs precomputed for 48 pairs") == 1, log[-3000:]
    assert f"reference log-probs read from cache {cached[0]} (48 pairs)" in log, log[-3000:]

    _two_virtual_processes(monkeypatch)
    for name in REFERENCES:
        cfg = mp_common.dpo_recipe(tmp_path, model, data, run_dir=str(tmp_path / name), export=True)
        cfg.dpo.precompute_ref_log_probs = name == "precomputed"
        loop.train(cfg)
        got, want = _metrics(mp / name), _metrics(tmp_path / name)
        assert sorted(got) == sorted(want) == list(range(5)), name  # eval at 0, train steps 1..4
        for step in want:
            for prefix in ("", "eval_"):
                _assert_dpo_metrics_close(got[step], want[step], prefix, f"{name} at step {step}")
        assert want[4]["eval_rewards/margins"] > 1e-3 and want[4]["rewards/margins"] > 1e-3, want[4]
        exported, reference = _tensors(mp / name / "export"), _tensors(tmp_path / name / "export")
        assert exported.keys() == reference.keys() and reference, name
        for k in reference:
            np.testing.assert_allclose(
                exported[k], reference[k], rtol=1e-5, atol=2e-6, err_msg=f"{name}: {k}"
            )


def test_missing_peer_fails_within_timeout(tmp_path):
    """Process 0 of 2 alone: a clear error and exit code 2 at the timeout, not a hang."""
    env = _env(4)
    env.update(
        COVENANT_COORDINATOR=f"127.0.0.1:{_free_port()}",
        COVENANT_NUM_PROCESSES="2",
        COVENANT_PROCESS_ID="0",
        COVENANT_INIT_TIMEOUT="5",
    )
    started = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "covenant_jax.cli",
            "convert",
            "hf-to-jax",
            str(tmp_path / "hf"),
            str(tmp_path / "out"),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.time() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "process 0 of 2 could not join the job at coordinator 127.0.0.1:" in proc.stderr
    assert "within 5s" in proc.stderr
    assert elapsed < 5 + 15  # start-up (imports) + the 5 s timeout


def _train_pair_until_a_checkpoint(tmp_path, heartbeat_s: int, step: int) -> list:
    """Two CLI processes training (a checkpoint every 2 steps) until ``step``'s is on disk."""
    from covenant_jax.convert.api import hf_to_jax

    hf = common.tiny_model_dir(tmp_path)
    data = common.chat_jsonl(tmp_path)
    hf_to_jax(hf, tmp_path / "conv")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        RECIPE.format(
            maker="recipe", repo=str(REPO), root=str(tmp_path), model=str(tmp_path / "conv"), data=str(data)
        )
    )
    env, port = _env(4), _free_port()
    procs = []
    for i in range(2):
        args = [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--init-timeout",
            "60",
            "--heartbeat-timeout",
            str(heartbeat_s),
            "train",
            str(recipe),
            "--config.train.steps=10000",
            "--config.train.checkpoint_every=2",
            "--config.train.eval_every=10000",
        ]
        log = open(tmp_path / f"proc{i}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "covenant_jax.cli", *args],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not any(p.name.isdigit() and int(p.name) >= step for p in checkpoints.glob("*")):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            _end(procs)
            pytest.fail("no checkpoint:\n" + (tmp_path / "proc0.log").read_text()[-3000:])
        time.sleep(0.2)
    return procs


def _end(procs) -> None:
    for p in procs:
        p.kill()  # a stopped process dies of SIGKILL too
        p.wait()


def _survivor_exit(procs, timeout: float) -> tuple[int, float]:
    """(process 0's exit code, seconds it took) after process 1 was stopped or killed."""
    started = time.time()
    try:
        rc = procs[0].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.time() - started


def test_dead_peer_stops_the_survivor_and_keeps_the_last_checkpoint(tmp_path):
    """Process 1 is killed mid-run: process 0 exits (no hang) and the last checkpoint restores."""
    import jax
    import orbax.checkpoint as ocp

    procs = _train_pair_until_a_checkpoint(tmp_path, heartbeat_s=10, step=4)
    try:
        procs[1].kill()
        rc, survived_s = _survivor_exit(procs, timeout=120)
    finally:
        _end(procs)
    tail = (tmp_path / "proc0.log").read_text()[-3000:]
    assert rc is not None and rc != 0, tail
    # gloo fails the next collective at once; else the peer watch speaks at the 10 s heartbeat
    assert survived_s < 10 + 10, (survived_s, tail)
    assert "has probably died or hung. Completed checkpoints are intact: restart every process" in tail, tail

    # The newest complete checkpoint restores (here onto one device: a different topology).
    checkpoints = tmp_path / "run" / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert step >= 4
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = ocp.StandardCheckpointer().metadata(checkpoints / str(step) / "state").item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), stored)
    state = ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state", target)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_hung_peer_stops_the_survivor_with_the_same_clear_message(tmp_path):
    """Process 1 is stopped (SIGSTOP: alive, silent, its sockets open): process 0 exits within
    the heartbeat timeout with one line saying which process stopped responding, not a C++
    fatal stack dump from the runtime's own heartbeat."""
    heartbeat_s = 8
    procs = _train_pair_until_a_checkpoint(tmp_path, heartbeat_s, step=2)
    try:
        os.kill(procs[1].pid, signal.SIGSTOP)
        rc, survived_s = _survivor_exit(procs, timeout=120)
    finally:
        _end(procs)
    log = (tmp_path / "proc0.log").read_text()
    assert rc == 1, log[-3000:]
    assert survived_s < heartbeat_s + 5, (survived_s, log[-3000:])
    errors = [line for line in log.splitlines() if line.startswith("covenant-jax: error:")]
    assert errors == [
        f"covenant-jax: error: process 0: process 1 has not responded for {heartbeat_s} s; "
        "it has probably died or hung. Completed checkpoints are intact: restart every "
        "process to resume."
    ], log[-3000:]
    assert "Check failure" not in log and "Terminating process" not in log, log[-3000:]
