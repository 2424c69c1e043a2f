"""SIGTERM / SIGINT: save at the next step, exit 75 with one line; rerunning resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from covenant_jax import cli
from covenant_jax.train import loop, preemption
from covenant_jax.train.checkpoint import RunCheckpointer
from tests.train import common


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return root, common.tiny_model_dir(root), common.chat_jsonl(root)


# A constant learning rate: a schedule over train.steps would differ between the long run that
# is stopped and the shorter reruns it is compared with.
RECIPE = """
from pathlib import Path
from tests.train import common

def get_config():
    cfg = common.tiny_recipe(Path({root!r}), Path({model!r}), Path({data!r}), steps=400,
                             checkpoint_every=1000, eval_every=0, async_checkpoint=True)
    cfg.optim.schedule = "constant"
    return cfg
"""


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # a line being written is left out
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _signal_mid_run(root, model_dir, data, signum) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `train` as a subprocess, sends ``signum`` once 3 steps are logged; (result, stop step)."""
    root.mkdir(exist_ok=True)
    recipe = root / "recipe.py"
    recipe.write_text(textwrap.dedent(RECIPE.format(root=str(root), model=str(model_dir), data=str(data))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "covenant_jax.cli", "train", str(recipe)],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = root / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(_losses(root / "run")) >= 3):
        assert time.time() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.1)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), max(_losses(root / "run"))


def test_sigterm_saves_then_resume_equals_uninterrupted(tmp_path, dirs):
    _, model_dir, data = dirs
    stopped, step = _signal_mid_run(tmp_path / "stopped", model_dir, data, signal.SIGTERM)
    checkpoints = tmp_path / "stopped" / "run" / "checkpoints"

    assert stopped.returncode == preemption.EXIT_PREEMPTED == 75, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert (
        f"covenant-jax: stopped by SIGTERM after step {step}: checkpoint saved in {checkpoints / str(step)}; "
        "rerun the same command to resume (exit code 75)"
    ) in stopped.stderr.splitlines()
    assert 3 <= step < 400 and RunCheckpointer(checkpoints).all_steps() == [step]

    # Rerun (to 2 more steps) == one uninterrupted run of as many steps.
    recipe = str(tmp_path / "stopped" / "recipe.py")
    assert cli.main(["train", recipe, f"--config.train.steps={step + 2}"]) == 0
    reference = common.tiny_recipe(
        tmp_path / "reference", model_dir, data, steps=step + 2, checkpoint_every=1000, eval_every=0
    )
    reference.optim.schedule = "constant"
    loop.train(reference)
    resumed, uninterrupted = _losses(tmp_path / "stopped" / "run"), _losses(tmp_path / "reference" / "run")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, step + 3))
    np.testing.assert_allclose(
        [resumed[s] for s in sorted(resumed)], [uninterrupted[s] for s in sorted(uninterrupted)], rtol=1e-6
    )
    a = RunCheckpointer(checkpoints).read_state(step + 2)
    b = RunCheckpointer(tmp_path / "reference" / "run" / "checkpoints").read_state(step + 2)
    import jax

    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigint_stops_the_same_way_without_a_traceback(tmp_path, dirs):
    _, model_dir, data = dirs
    stopped, step = _signal_mid_run(tmp_path, model_dir, data, signal.SIGINT)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert f"covenant-jax: stopped by SIGINT after step {step}" in stopped.stderr
    assert RunCheckpointer(tmp_path / "run" / "checkpoints").all_steps() == [step]


def test_a_second_sigint_stops_at_once():
    with preemption.StopRequest() as stop:
        assert not stop.agreed(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT" and stop.agreed(2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_an_interrupt_outside_the_loop_is_one_line(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert cli.main(["train", "configs/smollm2_sft_cpu.py"]) == 130
    err = capsys.readouterr().err
    assert err == "covenant-jax: interrupted; completed checkpoints are intact\n"
