"""Paths on an object store (gs://, served by a local GCS emulator) work wherever a local path
does: conversion both ways, training (model, data, run dir, checkpoints, export), resume, eval;
and outputs are checked (overlap with the input, writability) before any work."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from covenant_jax import cli, io as io_lib, storage
from covenant_jax.convert import params_checkpoint
from tests import gcs_emulator, helpers
from tests.train import common


@pytest.fixture(scope="module")
def gcs():
    """The emulator, with every client (gcsfs, TensorStore, google-cloud-storage) pointed at it."""
    with gcs_emulator.gcs_server(("bucket",)) as url:
        saved = dict(os.environ)
        os.environ.update(gcs_emulator.client_env(url))
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        try:
            yield url
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _put(local, url: str) -> str:
    """Uploads a local folder (recursively) to ``url``."""
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            storage.copy_file(storage.path(os.path.join(root, name)), storage.path(f"{url}/{rel}"))
    return url


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(storage.path(folder).glob("*.safetensors")):
        out.update(load_safetensors(f.read_bytes()))
    return out


def _fails(capsys, argv: list[str]) -> str:
    """Runs the CLI, which must exit 2 with one line on stderr; returns that line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _listing(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# ---- conversion ---------------------------------------------------------------------------------


def test_conversion_both_ways_through_gcs_is_bit_identical(gcs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative "gs:" folder would appear here
    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "hf", max_shard_size="60KB")
    assert cli.main(["convert", "hf-to-jax", str(hf), "gs://bucket/conv/jax"]) == 0
    assert (
        cli.main(
            [
                "convert",
                "jax-to-hf",
                "gs://bucket/conv/jax",
                "gs://bucket/conv/hf",
                "--max-shard-gb",
                "0.00006",
            ]
        )
        == 0
    )
    # and back again from the HF folder on GCS (ranged reads of remote safetensors)
    assert cli.main(["convert", "hf-to-jax", "gs://bucket/conv/hf", str(tmp_path / "jax_again")]) == 0
    assert not (tmp_path / "gs:").exists()
    source, exported = _tensors(hf), _tensors("gs://bucket/conv/hf")
    assert sorted(source) == sorted(exported)
    for key in source:
        np.testing.assert_array_equal(source[key], exported[key], err_msg=key)
    assert storage.path("gs://bucket/conv/hf/model.safetensors.index.json").exists()
    assert (
        storage.path("gs://bucket/conv/hf/tokenizer_config.json").exists()
        == (hf / "tokenizer_config.json").exists()
    )
    for folder in ("gs://bucket/conv/jax", "gs://bucket/conv/hf"):
        assert not storage.path(f"{folder}/{storage.INCOMPLETE}").exists()
    a = params_checkpoint.load_params_checkpoint("gs://bucket/conv/jax", mesh=helpers.one_device_mesh())
    b = params_checkpoint.load_params_checkpoint(tmp_path / "jax_again", mesh=helpers.one_device_mesh())
    from flax import nnx

    for (path, x), (_, y) in zip(
        nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))
    ):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))


def test_unfinished_remote_folder_is_refused_then_replaced(gcs, tmp_path, capsys):
    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    out = "gs://bucket/unfinished/jax"
    storage.path(f"{out}/{storage.INCOMPLETE}").write_text("")  # a writer that died mid-way
    storage.path(f"{out}/params/half").write_text("x")
    assert "is incomplete" in _fails(capsys, ["convert", "jax-to-hf", out, tmp_path / "x"])
    assert not (tmp_path / "x").exists()
    # a leftover of a failed write is not an output to protect: replaced without --overwrite
    assert cli.main(["convert", "hf-to-jax", str(hf), out]) == 0
    names = {p.name for p in storage.path(out).iterdir()}
    assert storage.INCOMPLETE not in names and "params" in names
    assert not storage.path(f"{out}/params/half").exists()


def test_failed_remote_write_leaves_nothing(gcs):
    out = storage.path("gs://bucket/failed/out")
    with pytest.raises(RuntimeError):
        with io_lib.atomic_output_dir(out) as folder:
            assert storage.path(f"{out}/{storage.INCOMPLETE}").exists()  # published only at the end
            (folder / "half.bin").write_bytes(b"1")
            raise RuntimeError("writer died")
    assert not out.exists()


# ---- training -----------------------------------------------------------------------------------


def test_training_on_gcs_resumes_there_and_exports(gcs, tmp_path):
    import jax
    from flax import nnx

    from covenant_jax.convert.api import load_model
    from covenant_jax.train import checkpoint, loop

    model = _put(common.tiny_model_dir(tmp_path), "gs://bucket/train/model")
    data = _put_file(common.chat_jsonl(tmp_path), "gs://bucket/train/chat.jsonl")
    run_dir = "gs://bucket/train/run"

    def cfg(steps):
        c = common.tiny_recipe(
            tmp_path, model, data, steps=steps, checkpoint_every=2, eval_every=0, export=True
        )
        c.train.run_dir = run_dir
        c.optim.schedule = "constant"  # so a run extended to more steps equals one planned for them
        return c

    loop.train(cfg(4))
    first = _metric_rows(run_dir)
    # A preemption after step 3: the checkpoint of step 4 never finished. Rerun, to more steps.
    storage.path(f"{run_dir}/checkpoints/4").rmtree()
    resumed = loop.train(cfg(6))
    assert resumed.steps == 4 and resumed.checkpoint_step == 6  # from the checkpoint of step 2
    rows = _metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the replayed steps 3, 4 logged once
    # resumed == uninterrupted: the state restored from GCS replays steps 3, 4 exactly
    np.testing.assert_allclose([r["loss"] for r in rows[:4]], [r["loss"] for r in first], rtol=1e-6)
    assert len(list(storage.path(f"{run_dir}/tensorboard").glob("events.out.tfevents.*"))) == 2

    # the export (an HF folder on GCS, loaded back from there) holds the checkpointed step 6
    exported = nnx.to_pure_dict(
        nnx.state(load_model(f"{run_dir}/export", mesh=helpers.one_device_mesh()), nnx.Param)
    )
    saved = checkpoint.RunCheckpointer(f"{run_dir}/checkpoints").read_state(6)["params"]
    flat_saved, flat_exported = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (saved, exported))
    assert flat_exported.keys() == flat_saved.keys() and len(flat_saved) > 5
    for path, value in flat_exported.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_saved[path]), err_msg=str(path))
    assert storage.path(f"{run_dir}/export/tokenizer.json").exists()


def _metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in storage.path(f"{run_dir}/metrics.jsonl").read_text().splitlines()]


def _put_file(local, url: str) -> str:
    storage.copy_file(storage.path(local), storage.path(url))
    return url


# ---- output checks before any work ---------------------------------------------------------------


@pytest.mark.parametrize("direction", ["hf-to-jax", "jax-to-hf"])
@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_overwrite_onto_the_input_is_refused(tmp_path, capsys, direction, where):
    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "data" / "hf")
    source = hf
    if direction == "jax-to-hf":
        assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "data" / "jax")]) == 0
        source = tmp_path / "data" / "jax"
    (tmp_path / "data" / "unrelated.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(source)
    out = {"same": source, "parent": source.parent, "inside": source / "out", "symlink": tmp_path / "link"}[
        where
    ]
    before = _listing(tmp_path / "data")
    assert "the input" in _fails(capsys, ["convert", direction, source, out, "--overwrite"])
    assert _listing(tmp_path / "data") == before


def test_remote_overwrite_onto_the_input_is_refused(gcs, tmp_path, capsys):
    src = _put(helpers.save_hf(helpers.hf_model(), tmp_path / "hf"), "gs://bucket/overlap/hf")
    assert "contains the input" in _fails(
        capsys, ["convert", "hf-to-jax", src, "gs://bucket/overlap", "--overwrite"]
    )
    assert storage.path(f"{src}/model.safetensors").exists()


def test_trainer_refuses_an_export_over_its_model(tmp_path):
    from covenant_jax.train import loop

    # the previous run's export as the model: this run's export would replace it
    cfg = common.tiny_recipe(tmp_path, tmp_path / "run" / "export", tmp_path / "chat.jsonl", export=True)
    with pytest.raises(storage.OutputOverlapsInputError, match="export folder"):
        loop.setup(cfg)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into: a read-only tmpfs for root (who ignores permission bits),
    else a folder without write permission; where root may not mount, a path under a regular
    file (writes there fail with ENOTDIR)."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    import subprocess

    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        folder.rmdir()
        (tmp_path / "a_file").write_text("not a folder")
        yield tmp_path / "a_file" / "ro"
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _unwritable(capsys, argv: list, where) -> None:
    err = _fails(capsys, argv)
    assert str(where) in err and "cannot write there" in err, err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, read_only_dir, monkeypatch):
    from covenant_jax.convert import hf_to_jax, jax_to_hf

    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "jax")]) == 0

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(hf_to_jax, "stream_hf", no_work)
    monkeypatch.setattr(jax_to_hf, "export_hf", no_work)
    for direction, source in (("hf-to-jax", hf), ("jax-to-hf", tmp_path / "jax")):
        _unwritable(capsys, ["convert", direction, source, read_only_dir / "out"], read_only_dir / "out")

    from covenant_jax.eval import common as eval_common

    monkeypatch.setattr(eval_common, "load_eval_model", no_work)
    out = read_only_dir / "ppl.json"
    _unwritable(
        capsys, ["eval", "perplexity", hf, tmp_path / "docs.jsonl", "--lengths", "16", "--out", out], out
    )


def test_unwritable_run_dir_is_refused_before_any_work(tmp_path, capsys, read_only_dir, monkeypatch):
    from covenant_jax.train import loop

    monkeypatch.setattr(loop, "make_mesh", lambda *a, **k: pytest.fail("work started"))
    config = tmp_path / "recipe.py"
    config.write_text(
        "from covenant_jax.train import recipe\n\ndef get_config():\n"
        f"    c = recipe.default_config()\n    c.model.path = {str(tmp_path / 'model')!r}\n"
        f"    c.train.run_dir = {str(read_only_dir / 'run')!r}\n    return c\n"
    )
    _unwritable(capsys, ["train", config], read_only_dir / "run")


def test_full_disk_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    assert "not enough space" in _fails(capsys, ["convert", "hf-to-jax", hf, tmp_path / "out"])
    assert not (tmp_path / "out").exists()


def test_missing_bucket_is_refused(gcs, tmp_path, capsys):
    hf = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    _unwritable(capsys, ["convert", "hf-to-jax", hf, "gs://no-such-bucket/x"], "gs://no-such-bucket/x")


def test_eval_reads_model_and_data_from_gcs_and_writes_out_there(gcs, tmp_path, capsys):
    model = _put(common.tiny_model_dir(tmp_path), "gs://bucket/eval/model")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{(i * j) % 300}" for j in range(40))}) + "\n" for i in range(2)
        )
    )
    out = "gs://bucket/eval/ppl.json"
    assert (
        cli.main(
            [
                "eval",
                "perplexity",
                model,
                _put_file(docs, "gs://bucket/eval/docs.jsonl"),
                "--lengths",
                "16",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "eval",
                "perplexity",
                str(tmp_path / "model"),
                str(docs),
                "--lengths",
                "16",
                "--out",
                str(tmp_path / "ppl.json"),
            ]
        )
        == 0
    )
    remote, local = json.loads(storage.path(out).read_text()), json.loads((tmp_path / "ppl.json").read_text())
    assert remote["rows"][0]["ppl"] == pytest.approx(local["rows"][0]["ppl"], rel=1e-6)
