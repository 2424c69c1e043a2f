"""Each bad input exits non-zero with a message naming the problem, and leaves no output."""

import json
import re
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from covenant_jax import cli
from tests import helpers


@pytest.fixture
def hf_dir(tmp_path):
    return helpers.save_hf(helpers.hf_model(), tmp_path / "hf")


def _convert(capsys, src, out, *extra):
    capsys.readouterr()  # the fixtures' save_pretrained progress bars
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


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "missing tensor 'model.layers.1.mlp.up_proj.weight'",
        ),
        (
            lambda t: t.__setitem__("model.extra.weight", t["model.norm.weight"].clone()),
            "unexpected tensor 'model.extra.weight'",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10].clone()),
            "tensor 'model.norm.weight' has shape [10] but config.json implies [64]",
        ),
    ],
)
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


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda c: c.update(architectures=["GPT2LMHeadModel"]),
            "architecture 'GPT2LMHeadModel' is not supported",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
            "rope_parameters.rope_type='longrope' is not supported",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
            "rope_parameters.low_freq_factor is required",
        ),
        (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
        (
            lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}),
            "rope_scaling.type='dynamic' is not supported",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": "2", "rope_theta": 1e4}),
            "rope_parameters.factor must be a number, got str '2'",
        ),
        (
            lambda c: c.update(rope_parameters={**_YARN, "truncate": "false"}),
            "rope_parameters.truncate must be true, false or null, got 'false'",
        ),
        # issue #12: types are checked as transformers' LlamaConfig does
        (
            lambda c: c.update(tie_word_embeddings="false"),
            "'tie_word_embeddings' is str 'false', but transformers' LlamaConfig needs bool",
        ),
        (
            lambda c: c.update(max_position_embeddings="128"),
            "'max_position_embeddings' is str '128', but transformers' LlamaConfig needs int",
        ),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (
            lambda c: c.update(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
            "the checkpoint is quantized (fp8, quantization_config); covenant_jax reads unquantized weights only: "
            "dequantize it with transformers first",
        ),
    ],
)
def test_config_problems_are_named(capsys, tmp_path, hf_dir, edit, expected):
    _edit_config(hf_dir, edit)
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    _assert_nothing_written(tmp_path / "out")


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4}


def test_mistral_default_sliding_window_is_refused(capsys, tmp_path):
    """transformers' MistralConfig reads an absent sliding_window as 4096: not full attention."""
    src = helpers.save_hf(
        helpers.hf_model(architecture="mistral", max_position_embeddings=8192), tmp_path / "hf"
    )
    _edit_config(src, lambda c: c.pop("sliding_window"))
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "sliding_window=4096 (absent: transformers' MistralConfig default) is less than "
        "max_position_embeddings=8192: sliding-window attention is not supported"
    ) in err
    _assert_nothing_written(tmp_path / "out")


_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int8_bitsandbytes(t):
    for key in [k for k in t if k.endswith(_LINEAR_WEIGHTS)]:
        t[key] = (t[key] * 127).round().clamp(-127, 127).to(torch.int8)
        t[key.replace(".weight", ".SCB")] = torch.ones(t[key].shape[0])


def _gptq(t):
    for key in [k for k in t if k.endswith(_LINEAR_WEIGHTS)]:
        out_features, in_features = t.pop(key).shape
        base = key.removesuffix(".weight")
        t[f"{base}.qweight"] = torch.zeros(in_features // 8, out_features, dtype=torch.int32)
        t[f"{base}.qzeros"] = torch.zeros(1, out_features // 8, dtype=torch.int32)
        t[f"{base}.scales"] = torch.ones(1, out_features, dtype=torch.float16)
        t[f"{base}.g_idx"] = torch.zeros(in_features, dtype=torch.int32)


def _fp8(t):
    for key in [k for k in t if k.endswith(_LINEAR_WEIGHTS)]:
        t[key] = t[key].to(torch.float8_e4m3fn)


def _int8_plain(t):
    key = "model.layers.0.mlp.up_proj.weight"
    t[key] = (t[key] * 127).round().to(torch.int8)


_LINEAR_WEIGHTS = tuple(f"{name}.weight" for name in _LINEAR)


@pytest.mark.parametrize(
    "weights,config,expected",
    [
        (
            _int8_bitsandbytes,
            {"quant_method": "bitsandbytes", "load_in_8bit": True},
            r"quantized \(bitsandbytes, quantization_config\)",
        ),
        (
            _gptq,
            {"quant_method": "gptq", "bits": 4, "group_size": 128},
            r"quantized \(gptq, quantization_config\)",
        ),
        (
            _gptq,
            None,
            r"quantized: tensor 'model\.layers\.\d+\.\w+\.\w+\.(qweight|qzeros|g_idx|scales)' is "
            r"(int32|float16) \(GPTQ/AWQ\)",
        ),
        (
            _int8_bitsandbytes,
            None,
            r"quantized: tensor '.*\.(weight' is int8|SCB' is float32 \(bitsandbytes int8\))",
        ),
        (_int8_plain, None, r"quantized: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is int8;"),
        (_fp8, None, r"quantized: tensor '.*_proj\.weight' is float8_e4m3fn;"),
    ],
    ids=["int8+bitsandbytes", "gptq+config", "gptq_tensors", "int8+SCB", "int8", "fp8_tensors"],
)
def test_quantized_checkpoints_are_refused(capsys, tmp_path, hf_dir, weights, config, expected):
    """Never a silent cast: one line saying quantized, which method, and what to do."""
    _edit_weights(hf_dir, weights)
    if config:
        _edit_config(hf_dir, lambda c: c.update(quantization_config=config))
    code, err = _convert(capsys, hf_dir, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(expected, err) and "dequantize it with transformers first" in err, err
    _assert_nothing_written(tmp_path / "out")


def test_fp8_in_a_pytorch_file_is_refused(capsys, tmp_path):
    """numpy has no float8: the tensor is still named as quantized, not a traceback."""
    src = helpers.save_hf(helpers.hf_model(), tmp_path / "bin", torch_bin=True)
    state = torch.load(src / "pytorch_model.bin")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(
        torch.float8_e4m3fn
    )
    torch.save(state, src / "pytorch_model.bin")
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "quantized: tensor 'model.layers.0.mlp.up_proj.weight' is not a numpy dtype" in err
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
    assert err.strip() == (
        "covenant-jax: error: reading the PyTorch file pytorch_model.bin needs torch, "
        "which is not installed: pip install 'covenant_jax[torch]' (or the torch "
        "build for your platform)"
    )
    _assert_nothing_written(tmp_path / "out")


def test_verify_without_torch_names_the_install(capsys, monkeypatch, hf_dir):
    _hide_torch(monkeypatch)
    capsys.readouterr()  # the fixture's save_pretrained progress bar
    assert cli.main(["verify", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "verify (transformers' PyTorch model is the reference) needs torch" in err
    )


def _refused(capsys, src, out):
    """Converts ``src`` (after dropping the fixture's progress bars) and returns the error line."""
    capsys.readouterr()
    code, err = _convert(capsys, src, out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    _assert_nothing_written(out)
    return err


def _edit_header(path, edit):
    """Rewrites a safetensors file's JSON header by hand (the library's writer refuses bad ones)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _move_offsets(name, to):
    return lambda h: h[name].__setitem__("data_offsets", to(h))


@pytest.mark.parametrize(
    "edit,expected",
    [
        # model.norm.weight is 64 float32 = 256 bytes; [-256, 0] would read the header's last bytes.
        (
            _move_offsets("model.norm.weight", lambda h: [-256, 0]),
            "tensor 'model.norm.weight' has data_offsets [-256, 0]: expected two non-negative integers",
        ),
        # Another tensor's bytes (same size): converted as the wrong weights before.
        (
            _move_offsets(
                "model.norm.weight", lambda h: h["model.layers.0.input_layernorm.weight"]["data_offsets"]
            ),
            "overlaps tensor 'model.layers.0.input_layernorm.weight'",
        ),
        (
            lambda h: h["model.norm.weight"].__setitem__("shape", [-64]),
            "tensor 'model.norm.weight' has shape [-64]: expected a list of non-negative integers",
        ),
        (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__ must map strings to strings"),
    ],
)
def test_header_layout_problems_are_named(capsys, tmp_path, hf_dir, edit, expected):
    _edit_header(hf_dir / "model.safetensors", edit)
    err = _refused(capsys, hf_dir, tmp_path / "out")
    assert "model.safetensors: " in err and expected in err


def test_bytes_after_the_last_tensor(capsys, tmp_path, hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    assert "model.safetensors: 8 bytes after the last tensor" in _refused(capsys, hf_dir, tmp_path / "out")


@pytest.fixture
def sharded_dir(tmp_path):
    return helpers.save_hf(helpers.hf_model(), tmp_path / "hf", max_shard_size="60KB")


def _edit_index(folder, fn):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def _second_shard_to(folder, where):
    """Moves the second shard to ``where`` (a path or a name) and points the index at it."""
    shard = next(folder.glob("model-00002-*.safetensors"))
    target = folder / where
    shard.rename(target)
    _edit_index(folder, lambda m: m.update({k: str(where) for k, v in m.items() if v == shard.name}))


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE"])
def test_index_shard_names_stay_inside_the_folder(capsys, tmp_path, sharded_dir, where):
    where = tmp_path / "outside.safetensors" if where == "ABSOLUTE" else where
    _second_shard_to(sharded_dir, where)
    err = _refused(capsys, sharded_dir, tmp_path / "out")
    assert f"model.safetensors.index.json: shard name {str(where)!r} is not a file name inside" in err


def _first_of(weight_map, shard_prefix):
    return next(k for k, v in weight_map.items() if v.startswith(shard_prefix))


def _list_in_first_shard(weight_map):
    first_shard = weight_map[_first_of(weight_map, "model-00001")]
    weight_map[_first_of(weight_map, "model-00002")] = first_shard


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            _list_in_first_shard,
            "lists tensor {key!r} in model-00001-of-00006.safetensors, which does not hold it",
        ),
        (
            lambda m: m.pop(_first_of(m, "model-00002")),
            "model-00002-of-00006.safetensors holds tensor {key!r}, which the index does not list there",
        ),
    ],
)
def test_index_agrees_with_its_shards(capsys, tmp_path, sharded_dir, edit, expected):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    key = _first_of(index["weight_map"], "model-00002")
    _edit_index(sharded_dir, edit)
    err = _refused(capsys, sharded_dir, tmp_path / "out")
    assert f"model.safetensors.index.json: {expected.format(key=key)}" in err


def test_index_weight_map_must_map_names_to_files(capsys, tmp_path, sharded_dir):
    path = sharded_dir / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": ["model-00001-of-00003.safetensors"]}))
    err = _refused(capsys, sharded_dir, tmp_path / "out")
    assert "weight_map must map tensor names to shard file names" in err
