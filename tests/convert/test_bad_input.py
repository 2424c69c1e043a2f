"""Each bad input exits non-zero with a message naming the problem, and leaves no output."""

import json
import sys

import pytest
from safetensors.torch import load_file, save_file

from covenant_jax import cli
from tests import helpers


@pytest.fixture
def hf_dir(tmp_path):
    return helpers.save_hf(helpers.hf_model(), tmp_path / "hf")


def _convert(capsys, src, out, *extra):
    code = cli.main(["convert", "hf-to-jax", str(src), str(out), *extra])
    return code, capsys.readouterr().err


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.__setitem__("model.extra.weight", t["model.norm.weight"].clone()), "unexpected tensor 'model.extra.weight'"),
    (lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10].clone()),
     "tensor 'model.norm.weight' has shape [10] but config.json implies [64]"),
])
def test_weight_problems_are_named(capsys, tmp_path, hf_dir, edit, expected):
    _edit_weights(hf_dir, edit)
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and expected in err
    _assert_nothing_written(tmp_path / "out")


def test_config_shape_disagreement(capsys, tmp_path, hf_dir):
    _edit_config(hf_dir, lambda c: c.update(intermediate_size=100))
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and "mlp.gate_proj.weight' has shape [112, 64] but config.json implies [100, 64]" in err


def test_truncated_file(capsys, tmp_path, hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and "model.safetensors: truncated" in err
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_header(capsys, tmp_path, hf_dir):
    path = hf_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12
    path.write_bytes(bytes(data))
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and "model.safetensors: corrupt header" in err


def test_missing_shard_of_index(capsys, tmp_path):
    src = helpers.save_hf(helpers.hf_model(), tmp_path / "hf", max_shard_size="60KB")
    next(src.glob("model-00002-*.safetensors")).unlink()
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2 and "model-00002-of-" in err and "missing" in err


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     "rope_parameters.rope_type='longrope' is not supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "rope_parameters.low_freq_factor is required"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
])
def test_config_problems_are_named(capsys, tmp_path, hf_dir, edit, expected):
    _edit_config(hf_dir, edit)
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and expected in err
    _assert_nothing_written(tmp_path / "out")


def test_non_empty_out_dir_needs_overwrite(capsys, tmp_path, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _convert(capsys, hf_dir, out)
    assert code == 2 and "exists and is not empty" in err and (out / "keep.txt").exists()
    code, _ = _convert(capsys, hf_dir, out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "params").is_dir()


def test_failed_overwrite_keeps_the_old_output(capsys, tmp_path, hf_dir):
    out = tmp_path / "out"
    assert _convert(capsys, hf_dir, out)[0] == 0
    _edit_config(hf_dir, lambda c: c.update(hidden_size=32))
    code, _ = _convert(capsys, hf_dir, out, "--overwrite")
    assert code == 2 and (out / "params").is_dir()


def test_bad_mesh(capsys, tmp_path, hf_dir):
    code, err = _convert(capsys, hf_dir, tmp_path / "out", "--mesh", "fsdp=3")
    assert code == 2 and "has 3 devices but 8 are present" in err



def _hide_torch(monkeypatch):
    """As on a TPU VM's install: importing torch fails (the test's own models are built first)."""
    monkeypatch.setitem(sys.modules, "torch", None)


def test_pytorch_file_without_torch_names_the_install(capsys, monkeypatch, tmp_path):
    bin_dir = helpers.save_hf(helpers.hf_model(), tmp_path / "bin", torch_bin=True)
    _hide_torch(monkeypatch)
    code, err = _convert(capsys, bin_dir, tmp_path / "out")
    assert code == 2
    assert err.strip() == ("covenant-jax: error: reading the PyTorch file pytorch_model.bin needs torch, "
                           "which is not installed: pip install 'covenant_jax[torch]' (or the torch "
                           "build for your platform)")
    _assert_nothing_written(tmp_path / "out")


def test_verify_without_torch_names_the_install(capsys, monkeypatch, hf_dir):
    _hide_torch(monkeypatch)
    capsys.readouterr()  # the fixture's save_pretrained progress bar
    assert cli.main(["verify", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verify (transformers' PyTorch model is the reference) needs torch" in err
