"""Checkpoints are verified when restored, never hold a non-finite state, and survive a full disk.

A run with checkpoints at steps 3 and 6 is trained once; each test damages a copy of it.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from covenant_jax.errors import CheckpointError
from covenant_jax.train import integrity, loop
from covenant_jax.train.checkpoint import RunCheckpointer
from tests.train import common


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, model_dir, data, checkpoints of a 6-step run saved at 3 and 6)."""
    root = tmp_path_factory.mktemp("integrity")
    model_dir, data = common.tiny_model_dir(root), common.chat_jsonl(root)
    loop.train(common.tiny_recipe(root / "ref", model_dir, data, steps=6, eval_every=0))
    return root, model_dir, data, root / "ref" / "run" / "checkpoints"


def _copy(checkpoints, run_dir):
    return shutil.copytree(checkpoints, run_dir / "checkpoints")


def _data_files(step_dir):
    """OCDBT's data files; which arrays each holds depends on the order of concurrent writes."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _largest_data_file(step_dir):
    return max(_data_files(step_dir), key=lambda p: p.stat().st_size)


def _flip_bytes(folder):
    """64 bytes inverted in the middle of every data file of step 6 (compressed or not)."""
    for path in _data_files(folder / "6"):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))


def _other_steps_state(folder):
    """Step 3's state under step 6's name: every file readable, the content not what step 6 saved."""
    shutil.rmtree(folder / "6" / "state")
    shutil.copytree(folder / "3" / "state", folder / "6" / "state")


def _truncate(folder):
    path = _largest_data_file(folder / "6")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(folder):
    for p in (folder / "6").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


DAMAGE = {
    # Inverted bytes in a zstd frame may fail to decompress or decompress to other numbers.
    "flipped bytes": (
        _flip_bytes,
        r"cannot be read \(ValueError: .*(ZSTD|Error reading)|content digests differ",
    ),
    "another step's state": (
        _other_steps_state,
        r"content digests differ from those saved for \['opt_state'\]|\['params'\]",
    ),
    "truncated data file": (_truncate, r"cannot be read \(ValueError: OUT_OF_RANGE: Error reading"),
    "missing manifest": (
        lambda f: (f / "6" / "state" / "manifest.ocdbt").unlink(),
        r"cannot be read \(ValueError: NOT_FOUND: .* does not exist",
    ),
    "emptied step folder": (_empty, r"its folder .*/6 is empty"),
    "deleted iterator file": (
        lambda f: (f / "6" / "data" / "process_0-of-1.json").unlink(),
        r"the data-iterator state .*/6/data/process_0-of-1.json is missing",
    ),
}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_state(got, want):
    """Same step and bit-identical params (read_state's untargeted opt_state has another structure)."""
    assert int(got["step"]) == int(want["step"])
    for a, b in zip(_leaves(got["params"]), _leaves(want["params"])):
        np.testing.assert_array_equal(a, b)


def _resume(trained, tmp_path) -> loop.Run:
    """The loop's own setup on a copy of the run in tmp_path/run (restores, compiles nothing)."""
    _, model_dir, data, _ = trained
    return loop.setup(common.tiny_recipe(tmp_path, model_dir, data, steps=6, eval_every=0))


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_step_falls_back_to_the_newest_intact(kind, trained, tmp_path, capsys):
    _, _, _, checkpoints = trained
    folder = _copy(checkpoints, tmp_path / "run")
    damage, reason = DAMAGE[kind]
    damage(folder)
    run = _resume(trained, tmp_path)
    run.checkpointer.close()
    run.writer.close()

    lines = [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line or "moved" in line]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"checkpoint step 6 in {folder} is damaged: ") and lines[0].endswith(
        "trying step 3"
    )
    assert re.search(reason, lines[0]), lines[0]
    assert lines[1] == (
        f"moved the damaged step 6 to {folder / '6.damaged'} (kept for inspection; delete it when done)"
    )
    assert lines[2] == f"resumed from {folder} at step 3"
    assert run.start_step == 3
    _assert_same_state(run.state, RunCheckpointer(checkpoints).read_state(3))
    assert run.train_iter.get_state() == json.loads(
        (checkpoints / "3" / "data" / "process_0-of-1.json").read_text()
    )
    # Nothing deleted: the damaged step is kept beside the others, out of Orbax's way.
    assert sorted(p.name for p in folder.iterdir()) == ["3", "6.damaged"]
    assert RunCheckpointer(folder).all_steps() == [3]


def test_every_step_damaged_is_refused_naming_each(trained, tmp_path):
    _, _, _, checkpoints = trained
    folder = _copy(checkpoints, tmp_path / "run")
    (folder / "6" / "data" / "process_0-of-1.json").unlink()
    (folder / "3" / "data" / "process_0-of-1.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"no intact checkpoint in .*\(step 6: the data-iterator state "
        r".* is missing .*; step 3: the data-iterator state",
    ):
        _resume(trained, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["3", "6"]  # nothing moved


def test_another_process_count_is_refused_not_skipped(trained, tmp_path):
    _, _, _, checkpoints = trained
    folder = _copy(checkpoints, tmp_path / "run")
    for step in ("3", "6"):
        data_dir = folder / step / "data"
        (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
        shutil.copy(data_dir / "process_0-of-2.json", data_dir / "process_1-of-2.json")
    with pytest.raises(CheckpointError, match="different number of processes"):
        _resume(trained, tmp_path)


def test_silently_changed_latest_step_resumes_from_the_one_before(trained, tmp_path, capsys):
    """Through the loop: step 6 reads but fails its digests, the run resumes at 3 and retrains 4-6 exactly."""
    root, model_dir, data, checkpoints = trained
    cfg = common.tiny_recipe(tmp_path, model_dir, data, steps=6, eval_every=0)
    _copy(checkpoints, tmp_path / "run")
    _other_steps_state(tmp_path / "run" / "checkpoints")
    summary = loop.train(cfg)
    out = capsys.readouterr().out
    assert "checkpoint step 6 in" in out and "is damaged: content digests differ" in out
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step 3" in out
    assert summary.steps == 3 and summary.checkpoint_step == 6
    _assert_same_state(
        RunCheckpointer(tmp_path / "run" / "checkpoints").read_state(6),
        RunCheckpointer(checkpoints).read_state(6),
    )
    assert (tmp_path / "run" / "checkpoints" / "6.damaged").is_dir()


def test_digests_do_not_depend_on_sharding_and_see_one_bit():
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
    put = lambda value, spec: jax.device_put(value, NamedSharding(mesh, spec))  # noqa: E731
    tree = {
        "w": put(x, P("a", "b")),
        "h": put(x.astype(jax.numpy.bfloat16), P()),
        "step": put(np.int32(3), P()),
    }
    resharded = {**tree, "w": put(x, P(None, "a"))}
    assert integrity.state_digests(tree) == integrity.state_digests(resharded)
    flipped = x.copy()
    flipped.view(np.uint32)[5, 7] ^= 1  # the lowest mantissa bit of one element
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    for changed in (flipped, swapped):
        digests = integrity.state_digests({**tree, "w": put(changed, P("a", "b"))})
        assert digests["['w']"] != integrity.state_digests(tree)["['w']"]
        assert digests["['h']"] == integrity.state_digests(tree)["['h']"]


def test_nan_on_a_checkpoint_step_is_never_saved(trained, tmp_path):
    """Finite gradients, but the update overflows the params at step 2 (a checkpoint step)."""
    _, model_dir, data, _ = trained
    cfg = common.tiny_recipe(tmp_path, model_dir, data, steps=4, checkpoint_every=1, eval_every=0)
    cfg.optim.update(dict(lr=1e25, weight_decay=1e25, decay_exclude=(), clip_norm=0.0, warmup_steps=2))
    with pytest.raises(
        loop.NonFiniteLoss,
        match=r"non-finite parameters or optimizer state after the update of step 2 .*"
        r"this state is not saved; the last checkpoint \(1\) is intact",
    ):
        loop.train(cfg)
    ckpt = RunCheckpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [1]
    assert all(np.isfinite(x).all() for x in _leaves(ckpt.read_state(1)))


RECIPE = """
from pathlib import Path
from tests.train import common

def get_config():
    return common.tiny_recipe(Path({root!r}), Path({model!r}), Path({data!r}), steps=6, eval_every=0)
"""


def _cap_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def _train_capped(recipe):
    """`covenant-jax train` with files capped at 100 kB (the kernel refuses larger writes: EFBIG)."""
    return subprocess.run(
        [sys.executable, "-m", "covenant_jax.cli", "train", str(recipe)],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        preexec_fn=_cap_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "rror" in line]
    assert errors == [line for line in proc.stderr.splitlines() if line.startswith("covenant-jax: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_full_disk_while_preparing_data_is_one_line_and_leaves_no_shard(trained, tmp_path):
    """The data cache's ArrayRecord writer reports a failed write as a RuntimeError naming strerror."""
    _, model_dir, data, _ = trained
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        textwrap.dedent(RECIPE.format(root=str(tmp_path), model=str(model_dir), data=str(data)))
    )
    cache = tmp_path / "run" / "data_cache"
    big = data.parent / "big.jsonl"  # Enough rows for a shard over the cap.
    big.write_text(data.read_text() * 40)
    recipe.write_text(recipe.read_text().replace(repr(str(data)), repr(str(big))))
    error = _one_error_line(_train_capped(recipe))
    assert error.startswith(
        f"covenant-jax: error: storage: file too large for the file system or a size limit ({cache}"
    ), error
    assert not [p for p in cache.rglob("*") if "shard" in p.name], list(cache.rglob("*"))


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(trained, tmp_path):
    """Resume from step 3 (its data cache prepared) with files capped at 100 kB: step 6 cannot be written."""
    _, model_dir, data, checkpoints = trained
    run_checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(checkpoints, run_checkpoints)
    shutil.rmtree(run_checkpoints / "6")
    shutil.copytree(checkpoints.parent / "data_cache", tmp_path / "run" / "data_cache")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        textwrap.dedent(RECIPE.format(root=str(tmp_path), model=str(model_dir), data=str(data)))
    )
    error = _one_error_line(_train_capped(recipe))
    assert error.startswith(
        f"covenant-jax: error: could not write checkpoint step 6 to {run_checkpoints}: "
        "File too large; the last complete checkpoint, step 3, is intact"
    )
    assert sorted(p.name for p in run_checkpoints.iterdir()) == ["3"]  # no partial step left
    _assert_same_state(
        RunCheckpointer(run_checkpoints).read_state(3), RunCheckpointer(checkpoints).read_state(3)
    )


def test_a_refused_write_is_known_by_its_errno_whatever_its_text():
    """TensorStore raises OSErrors whose text is its own, and other errors carry os_error_code:
    both are a refused write (one line), read by the errno, not by the OS's words."""
    import errno

    from covenant_jax.train.checkpoint import _write_failure

    assert _write_failure(OSError(errno.EFBIG, "Error writing local file")) == "File too large"
    wrapped = ValueError("write failed [os_error_code='28'] at /x")
    assert _write_failure(RuntimeError("save failed").with_traceback(None)) is None
    try:
        raise RuntimeError("save failed") from wrapped
    except RuntimeError as e:
        assert _write_failure(e) == "No space left on device"
    assert _write_failure(ValueError("shape mismatch")) is None
