"""metrics.jsonl and TensorBoard after a resume: the replayed steps appear once, with the values
of the run that replayed them."""

import json

from tensorboard.backend.event_processing import event_accumulator

from covenant_jax.train.metrics import MetricsWriter


def _log(run_dir, start_step: int, steps: range, offset: float) -> None:
    writer = MetricsWriter(run_dir, start_step)
    for step in steps:
        writer.write(step, {"loss": step + offset})
    writer.close()


def _tensorboard_losses(run_dir) -> list[tuple[int, float]]:
    """What TensorBoard shows: its own loader, which applies the purge events."""
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, round(e.value, 3)) for e in acc.Scalars("loss")]


def test_resume_replays_each_step_once(tmp_path):
    _log(tmp_path, 0, range(1, 6), 0.0)  # steps 1..5 logged; the last checkpoint was step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    _log(tmp_path, 3, range(4, 8), 0.5)  # resumed from step 3: 4 and 5 replayed, then 6, 7
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4.5),
        (5, 5.5),
        (6, 6.5),
        (7, 7.5),
    ]
    assert _tensorboard_losses(tmp_path) == [(1, 1), (2, 2), (3, 3), (4, 4.5), (5, 5.5), (6, 6.5), (7, 7.5)]


def test_fresh_run_in_an_old_run_dir_starts_over(tmp_path):
    _log(tmp_path, 0, range(0, 3), 0.0)
    _log(tmp_path, 0, range(0, 2), 0.25)  # no checkpoint was ever written: everything replays
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.25), (1, 1.25)]
    assert _tensorboard_losses(tmp_path) == [(0, 0.25), (1, 1.25)]
