"""The error contract, verb by verb: each bad input exits 2 with one line naming the cause, no
traceback, and nothing written; checks that can come first come before any loading or compiling."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest

from covenant_jax import cli
from tests.train import common

RECIPE = """
from pathlib import Path
from tests.train import common

def get_config():
    return common.tiny_recipe(Path({root!r}), Path({model!r}), Path({data!r}), steps=2, eval_every=0)
"""

DPO_RECIPE = """
from pathlib import Path
from tests.train import common

def get_config(variant=""):
    cfg = common.tiny_dpo_recipe(Path({root!r}), Path({model!r}), Path({pairs!r}), steps=2, eval_every=0)
    if variant == "renamed":  # a preference field no row has
        cfg.data.sources[0]["fields"] = dict(chosen="good")
    if variant == "sft":  # pairs read as SFT data would drop every rejected answer
        cfg.train.objective = "sft"
    return cfg
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    model = common.tiny_model_dir(root)
    data = common.chat_jsonl(root)
    recipe = root / "recipe.py"
    recipe.write_text(RECIPE.format(root=str(root), model=str(model), data=str(data)))
    dpo = root / "dpo.py"
    dpo.write_text(DPO_RECIPE.format(root=str(root), model=str(model), pairs=str(common.pairs_jsonl(root))))
    other_shape = common.tiny_model_dir(root / "other_shape", num_hidden_layers=1)
    (root / "syntax.py").write_text("def get_config(:\n    pass\n")
    texts = root / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"text": " ".join(f"w{i}" for i in range(30))}) + "\n" for _ in range(2))
    )
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model / name).read_bytes())
    from tests.convert.test_peft_adapter import _edit_config, peft_adapter_dir

    _, narrow, _ = peft_adapter_dir(root / "narrow", hidden_size=32)  # another base's adapter
    _, dora, _ = peft_adapter_dir(root / "dora")
    _edit_config(dora, use_dora=True)
    return {
        "root": root,
        "model": model,
        "recipe": recipe,
        "texts": texts,
        "no_tok": no_tokenizer,
        "narrow": narrow,
        "dora": dora,
        "dpo": dpo,
        "other_shape": other_shape,
    }


# (argv with {placeholders}, text the one error line must contain)
CASES = {
    "train: no recipe file": (["train", "{root}/nope.py"], "recipe {root}/nope.py: no such file"),
    "train: recipe syntax error": (
        ["train", "{root}/syntax.py"],
        "recipe {root}/syntax.py:1: invalid syntax",
    ),
    "train: unknown variant": (
        ["train", "configs/smollm2_sft_cpu.py:runlocl"],
        "recipe variant 'runlocl' does not exist; this recipe has: runlocal",
    ),
    "train: unknown key": (
        ["train", "{recipe}", "--config.train.stesp=3"],
        "unknown key train.stesp; train has: ",
    ),
    "train: remat": (["train", "{recipe}", "--config.model.remat=ful"], "model.remat='ful': must be one of"),
    "train: attention": (
        ["train", "{recipe}", "--config.model.attention=flash"],
        "model.attention='flash': must be one of",
    ),
    "train: param_dtype": (
        ["train", "{recipe}", "--config.model.param_dtype=float33"],
        "model.param_dtype='float33'",
    ),
    "train: mesh 0": (["train", "{recipe}", "--config.mesh.data=0"], "mesh.data=0: must be a positive size"),
    "train: micro_batches 0": (
        ["train", "{recipe}", "--config.train.micro_batches=0"],
        "train.micro_batches=0: must be >= 1",
    ),
    "train: loss_chunk_size 0": (
        ["train", "{recipe}", "--config.train.loss_chunk_size=0"],
        "train.loss_chunk_size=0: must be >= 1",
    ),
    "train: checkpoint_every 0": (
        ["train", "{recipe}", "--config.train.checkpoint_every=0"],
        "train.checkpoint_every=0: must be >= 1",
    ),
    "train: keep_checkpoints 0": (
        ["train", "{recipe}", "--config.train.keep_checkpoints=0"],
        "train.keep_checkpoints=0: must be >= 1",
    ),
    "train: negative lr": (
        ["train", "{recipe}", "--config.optim.lr=-0.001"],
        "optim.lr=-0.001: must be >= 0",
    ),
    "train: b2 out of range": (
        ["train", "{recipe}", "--config.optim.b2=1.5"],
        "optim.b2=1.5: must be in [0, 1)",
    ),
    "train: seq_len 0": (["train", "{recipe}", "--config.data.seq_len=0"], "data.seq_len=0: must be >= 2"),
    "train: no tokenizer": (
        ["train", "{recipe}", "--config.model.path={no_tok}"],
        "no_tokenizer: no tokenizer files",
    ),
    "train: lora target": (
        ["train", "{recipe}", "--config.model.lora.enabled=True", "--config.model.lora.targets=q,qq"],
        "model.lora.targets=('q', 'qq'): 'qq' matches no module; targets are q, k, v",
    ),
    "train: lora rank 0": (
        ["train", "{recipe}", "--config.model.lora.enabled=True", "--config.model.lora.rank=0"],
        "model.lora.rank=0: must be an integer >= 1",
    ),
    "train: lora adapter of another base": (
        [
            "train",
            "{recipe}",
            "--config.model.lora.enabled=True",
            "--config.model.lora.rank=4",
            "--config.model.lora.alpha=8",
            "--config.model.lora.adapter={narrow}",
        ],
        "has shape [4, 32] but this model's needs [4, 64]: the adapter was trained on another base model",
    ),
    "train: lora adapter rank differs": (
        ["train", "{recipe}", "--config.model.lora.enabled=True", "--config.model.lora.adapter={narrow}"],
        "it has r=4 but the recipe's model.lora.rank is 8; set --config.model.lora.rank to match",
    ),
    "train: lora adapter with DoRA": (
        ["train", "{recipe}", "--config.model.lora.enabled=True", "--config.model.lora.adapter={dora}"],
        "DoRA (use_dora)",
    ),
    "train: lora dpo with a reference folder": (
        ["train", "{dpo}", "--config.model.lora.enabled=True", "--config.dpo.ref_model_path={model}"],
        "with model.lora the reference is the base with the adapters off",
    ),
    "lora-merge: adapter of another base": (
        ["convert", "lora-merge", "{model}", "{narrow}", "{root}/out"],
        "the adapter was trained on another base model",
    ),
    "lora-merge: DoRA": (["convert", "lora-merge", "{model}", "{dora}", "{root}/out"], "DoRA (use_dora)"),
    "export: not a run dir": (["export", "{model}"], "no checkpoints folder"),
    "export: step 0": (["export", "{root}", "--step", "0"], "--step: '0' is not a positive integer"),
    "train: unknown objective": (
        ["train", "{recipe}", "--config.train.objective=ppo"],
        "train.objective='ppo': must be one of",
    ),
    "train: dpo beta 0": (["train", "{dpo}", "--config.dpo.beta=0"], "dpo.beta=0"),
    "train: dpo unknown loss type": (
        ["train", "{dpo}", "--config.dpo.loss_type=('sigmod',)"],
        "dpo.loss_type=['sigmod']: each must be one of",
    ),
    "train: dpo preference field no row has": (
        ["train", "{dpo}:renamed"],
        "field 'good' (dpo `chosen`) does not exist in any row",
    ),
    "train: preference pairs with the sft objective": (
        ["train", "{dpo}:sft"],
        "format 'dpo' are preference pairs: set train.objective='dpo'",
    ),
    "train: dpo reference of another shape": (
        ["train", "{dpo}", "--config.dpo.ref_model_path={other_shape}"],
        "the reference disagrees with the policy (model.path) in num_hidden_layers 1 (the policy's: 2)",
    ),
    "hf-to-jax: no such model folder": (
        ["convert", "hf-to-jax", "{root}/missing", "{root}/out"],
        "missing does not exist: expected a model folder (config.json and weights)",
    ),
    "lora-merge: no such base folder": (
        ["convert", "lora-merge", "{root}/data_cache_none", "{dora}", "{root}/merged"],
        "data_cache_none does not exist: expected a model folder",
    ),
    "hf-to-jax: bad mesh": (
        ["convert", "hf-to-jax", "{model}", "{root}/out", "--mesh", "fsdp=0"],
        "mesh axis fsdp=0",
    ),
    "jax-to-hf: shard size 0": (
        ["convert", "jax-to-hf", "{model}", "{root}/out", "--max-shard-gb", "0"],
        "argument --max-shard-gb: '0' is not a positive number",
    ),
    "jax-to-hf: not converted": (
        ["convert", "jax-to-hf", "{model}", "{root}/out"],
        "not a converted checkpoint",
    ),
    "verify: seq-len 0": (
        ["verify", "{model}", "--seq-len", "0"],
        "argument --seq-len: '0' is not a positive integer",
    ),
    "verify: seq-len too long": (
        ["verify", "{model}", "--seq-len", "100000"],
        "--seq-len 100000: must be in [1, 128]",
    ),
    "perplexity: lengths abc": (
        ["eval", "perplexity", "{model}", "{texts}", "--lengths", "abc"],
        "argument --lengths: 'abc' is not a comma-separated list",
    ),
    "perplexity: stride 0": (
        ["eval", "perplexity", "{model}", "{texts}", "--lengths", "8", "--stride", "0"],
        "argument --stride: '0' is not a positive integer",
    ),
    "perplexity: batch 0": (
        ["eval", "perplexity", "{model}", "{texts}", "--lengths", "8", "--batch-size", "0"],
        "argument --batch-size",
    ),
    "perplexity: longer than every document": (
        ["eval", "perplexity", "{model}", "{texts}", "--lengths", "8,500"],
        "length 500: no document has 500 tokens; the longest has",
    ),
    "perplexity: no tokenizer": (
        ["eval", "perplexity", "{no_tok}", "{texts}", "--lengths", "8"],
        "no tokenizer files",
    ),
    "passkey: keys 0": (
        ["eval", "passkey", "{model}", "--lengths", "64", "--keys-per-cell", "0"],
        "argument --keys-per-cell",
    ),
    "passkey: batch 0": (
        ["eval", "passkey", "{model}", "--lengths", "64", "--batch-size", "0"],
        "argument --batch-size",
    ),
    "passkey: depth 2": (
        ["eval", "passkey", "{model}", "--lengths", "64", "--depths", "0,2"],
        "argument --depths: '0,2' is not a comma-separated list of numbers in [0, 1]",
    ),
    "data prepare: eval_mode": (
        ["data", "prepare", "{recipe}", "--config.data.eval_mode=platform"],
        "data.eval_mode='platform': must be one of",
    ),
    "data prepare: workers -1": (
        ["data", "prepare", "{recipe}", "--config.data.workers=-1"],
        "data.workers=-1: must be >= 0",
    ),
    "data prepare: shard_rows 0": (
        ["data", "prepare", "{recipe}", "--config.data.shard_rows=0"],
        "data.shard_rows=0: must be >= 1",
    ),
    "plan: max candidates 0": (
        ["plan", "{recipe}", "--topology", "v5e:2x2", "--max-candidates", "0"],
        "argument --max-candidates",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, files, capsys):
    argv, expected = CASES[case]
    fill = {k: str(v) for k, v in files.items()}
    capsys.readouterr()
    started = time.time()
    code = cli.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("covenant-jax: error: "), err
    assert expected.format(**fill) in lines[0]
    assert time.time() - started < 30, "the check should come before loading or compiling"
    assert not (files["root"] / "out").exists()


def test_full_disk_during_conversion_is_one_line_and_leaves_nothing(files, tmp_path):
    """A file-size limit makes writes fail as a full disk does (EFBIG for ENOSPC)."""

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "covenant_jax.cli", "convert", "hf-to-jax", str(files["model"]), str(out)],
        preexec_fn=small_disk,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("covenant-jax: error: storage: file too large"), (
        proc.stderr
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))
