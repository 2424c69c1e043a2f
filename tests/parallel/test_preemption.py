"""Two CLI processes (gloo): SIGTERM to one of them stops both after the same step, checkpoint saved."""

import signal
import subprocess
import sys
import time

from tests.parallel.test_multiprocess import REPO, RECIPE, _env, _free_port
from tests.train import common


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    hf, data = common.tiny_model_dir(tmp_path), common.chat_jsonl(tmp_path)
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        RECIPE.format(maker="recipe", repo=str(REPO), root=str(tmp_path), model=str(hf), data=str(data))
    )
    env, port = _env(4), _free_port()
    procs, logs = [], []
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
            "train",
            str(recipe),
            "--config.train.steps=10000",
            "--config.train.checkpoint_every=10000",
            "--config.train.eval_every=0",
        ]
        logs.append(tmp_path / f"proc{i}.log")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "covenant_jax.cli", *args],
                env=env,
                cwd=REPO,
                stdout=open(logs[i], "w"),
                stderr=subprocess.STDOUT,
            )
        )
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[
                -3000:
            ]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # JAX's preemption service tells process 0
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = [log.read_text() for log in logs]
    assert codes == [75, 75], out[0][-3000:] + out[1][-3000:]
    assert not any("Traceback" in o for o in out)
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 3, steps
    step_dir = tmp_path / "run" / "checkpoints" / str(steps[0])
    assert (
        f"covenant-jax: stopped by a preemption notice (SIGTERM) after step {steps[0]}: checkpoint "
        f"saved in {step_dir}" in out[0]
    )
    assert sorted(p.name for p in (step_dir / "data").iterdir() if p.name.startswith("process_")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
