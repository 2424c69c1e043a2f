"""verify: ours vs transformers, each measured from transformers' float64 logits."""

import numpy as np
import pytest

from covenant_jax import cli
from covenant_jax.convert import verify as verify_lib
from tests import helpers


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return helpers.save_hf(helpers.hf_model(), tmp_path_factory.mktemp("verify") / "hf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_healthy_model_passes_and_reports_both_distances(capsys, hf_dir, dtype):
    capsys.readouterr()
    assert cli.main(["verify", str(hf_dir), "--dtype", dtype, "--seq-len", "96"]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"{dtype}: mean |Δlogits| from transformers float64: ours ")
    assert (
        ", transformers " in report
        and "(2 x transformers + " in report
        and ": OK  [max |Δlogits| ours " in report
    )


def test_one_weight_off_by_1e_3_fails(tmp_path, hf_dir):
    """One tensor shifted by 1e-3 (in fp32) is far beyond 2x transformers' own float32 error."""
    import safetensors.numpy
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    tensors = safetensors.numpy.load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"] += np.float32(1e-3)
    safetensors.numpy.save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    parity = verify_lib.verify(hf_dir, bad, seq_len=96)
    assert not parity.ok and parity.ours.mean > 10 * parity.limit, parity.report()
    assert verify_lib.verify(hf_dir, hf_dir, seq_len=96).ok


def test_limit_is_factor_times_transformers_mean_plus_floor():
    exact = np.full((1, 4, 8), 2.0)
    theirs, ours = exact + 1e-3, exact + 2.5e-3
    ours[0, 0, 0] += 1.0  # one outlier moves the mean by 1/32
    parity = verify_lib.compare(exact, theirs, ours, "float32")
    assert parity.transformers.mean == pytest.approx(1e-3) and parity.ours.mean == pytest.approx(
        2.5e-3 + 1 / 32
    )
    assert parity.ours.max == pytest.approx(1.0025) and parity.transformers.max == pytest.approx(1e-3)
    assert parity.limit == pytest.approx(2 * 1e-3 + 1e-7 * 2.0) and not parity.ok
    assert verify_lib.compare(exact, theirs, exact + 1.9e-3, "float32").ok
    assert verify_lib.compare(exact, theirs, ours, "float32", factor=40.0).ok
    assert verify_lib.compare(exact, theirs, ours, "float32", tolerance=0.04).ok
