"""Check an install: every module imports and every verb runs end to end on a tiny model.

What a TPU VM or GPU host runs after ``pip install -e '.[tpu]'`` (no torch) to know the
install is complete before a long job starts; CI runs it in a torch-free environment. In a
temporary folder it builds a tiny random Llama (safetensors, numpy only) with a word-level
tokenizer and a chat template, then runs the real ``covenant-jax`` entry point:

  convert hf-to-jax -> train 3 steps (checkpoint, resume, HF export) -> DPO 3 steps on
  preference pairs (TRL's metric names) -> convert jax-to-hf (bit-identical to the source)
  -> plan on a small TPU topology (when libtpu is installed)

and, when torch is absent, checks that the verbs that need it (``verify``, reading ``.bin``)
say so in one line with exit 2. Exit 0 when everything passed.

    python tools/check_install.py [--no-torch] [--tpu] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] + [
    f"w{i}" for i in range(119)
]  # 128 tokens
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=len(WORDS),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=2,
    eos_token_id=3,
    torch_dtype="float32",
)
RECIPE = """
from covenant_jax.train import recipe

def get_config():
    cfg = recipe.default_config()
    cfg.model.path = {model!r}
    cfg.data.sources = [dict(path={data!r}, format="messages")]
    cfg.data.seq_len = 64
    cfg.data.batch_size = 4
    cfg.data.eval_count = 4
    cfg.train.update(dict(steps=3, run_dir={run!r}, log_every=1, eval_every=3, checkpoint_every=2,
                          progress=False, loss_chunk_size=32, async_checkpoint=False))
    {dpo}
    return cfg
"""
# What the DPO check adds to RECIPE: pairs, the objective (the reference in the step).
DPO = "cfg.train.objective = 'dpo'; cfg.data.sources[0]['format'] = 'dpo'"
# The metrics a DPO run logs under TRL's names (train, and eval_ + name at an eval step).
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")  # fmt: skip


class CheckFailed(Exception):
    pass


def step(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            started = time.time()
            print(f"  {name} ...", end="", flush=True)
            out = fn(*args, **kwargs)
            print(f" ok ({time.time() - started:.1f}s)", flush=True)
            return out

        return run

    return wrap


@step("import every covenant_jax module")
def import_all(no_torch: bool) -> None:
    import covenant_jax

    failed = []
    for module in pkgutil.walk_packages(covenant_jax.__path__, "covenant_jax."):
        try:
            importlib.import_module(module.name)
        except Exception as e:  # noqa: BLE001 - report every module that fails
            failed.append(f"{module.name}: {type(e).__name__}: {e}")
    if failed:
        raise CheckFailed("modules that do not import:\n    " + "\n    ".join(failed))
    if no_torch and "torch" in sys.modules:
        raise CheckFailed("importing covenant_jax imported torch")


@step("build a tiny random Llama (safetensors, tokenizer, chat data)")
def tiny_model(root: Path) -> tuple[Path, Path]:
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = root / "hf"
    folder.mkdir()
    rng = np.random.default_rng(0)
    c = CONFIG
    d, f, v, h = c["hidden_size"], c["intermediate_size"], c["vocab_size"], d_head(c)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (c["num_attention_heads"] * h, d),
                p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * h, d),
                p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * h, d),
                p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * h),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    tensors = {
        k: (rng.standard_normal(s) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0)).astype(np.float32)
        for k, s in shapes.items()
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    data = root / "chat.jsonl"
    with open(data, "w") as out:
        for i in range(48):
            out.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": words(i * 7, 4)},
                            {"role": "assistant", "content": words(i * 7 + 3, 6)},
                        ]
                    }
                )
                + "\n"
            )
    return folder, data


def words(first: int, n: int) -> str:
    """``n`` of the tokenizer's plain words, from the ``first``-th on (cyclically)."""
    return " ".join(f"w{(first + k) % 119}" for k in range(n))


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def d_head(c: dict) -> int:
    return c["hidden_size"] // c["num_attention_heads"]


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "covenant-jax"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "covenant_jax.cli"]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True)
    if proc.returncode != expect:
        raise CheckFailed(
            f"covenant-jax {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


@step("convert hf-to-jax")
def to_jax(hf: Path, root: Path) -> Path:
    cli("convert", "hf-to-jax", str(hf), str(root / "ckpt"))
    return root / "ckpt"


@step("train 3 steps (checkpoints, eval, HF export), then resume to 4")
def train(ckpt: Path, data: Path, root: Path) -> Path:
    recipe = root / "recipe.py"
    run = root / "run"
    recipe.write_text(RECIPE.format(model=str(ckpt), data=str(data), run=str(run), dpo=""))
    cli("train", str(recipe))
    cli("train", str(recipe), "--config.train.steps=4")
    rows = metrics(run)
    steps = [r["step"] for r in rows if "loss" in r]
    if steps != [1, 2, 3, 4] or not all(np.isfinite(r["loss"]) for r in rows if "loss" in r):
        raise CheckFailed(f"metrics.jsonl: expected finite losses at steps 1-4, got {rows}")
    if not (run / "export" / "model.safetensors").is_file():
        raise CheckFailed(f"no HF export in {run / 'export'}")
    return run


@step("DPO 3 steps on preference pairs (reference in the step, TRL's metric names)")
def dpo(ckpt: Path, root: Path) -> None:
    pairs, run, recipe = root / "pairs.jsonl", root / "dpo_run", root / "dpo_recipe.py"
    rows = [
        {"prompt": words(i * 5, 4), "chosen": words(i * 5 + 7, 3), "rejected": words(i * 5 + 60, 5)}
        for i in range(24)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe.write_text(RECIPE.format(model=str(ckpt), data=str(pairs), run=str(run), dpo=DPO))
    cli("train", str(recipe))
    rows = {r["step"]: r for r in metrics(run)}
    want = {1: TRL_METRICS, 2: TRL_METRICS, 3: TRL_METRICS + tuple(f"eval_{k}" for k in TRL_METRICS)}
    missing = {step: [k for k in keys if k not in rows.get(step, {})] for step, keys in want.items()}
    if any(missing.values()) or not all(np.isfinite(v) for r in rows.values() for v in r.values()):
        raise CheckFailed(f"DPO metrics.jsonl: missing {missing} or not finite, in {rows}")


@step("convert jax-to-hf (bit-identical to the source)")
def to_hf(ckpt: Path, hf: Path, root: Path) -> None:
    from safetensors.numpy import load_file

    cli("convert", "jax-to-hf", str(ckpt), str(root / "hf_back"))
    before, after = load_file(hf / "model.safetensors"), load_file(root / "hf_back" / "model.safetensors")
    if before.keys() != after.keys() or any(before[k].tobytes() != after[k].tobytes() for k in before):
        raise CheckFailed("the round trip HF -> JAX -> HF changed the weights")


@step("plan on a v5e:2x2 TPU topology (libtpu's compiler, no TPU)")
def plan(root: Path) -> None:
    out = json.loads(
        cli("plan", str(root / "recipe.py"), "--topology", "v5e:2x2", "--json", "--no-search").stdout
    )
    if out.get("fits") is not True:
        raise CheckFailed(f"plan: the tiny model should fit v5e:2x2; got {out}")


@step("verbs that need torch say so (exit 2, one line)")
def torch_verbs(hf: Path, root: Path) -> None:
    bin_dir = root / "hf_bin"
    bin_dir.mkdir()
    shutil.copy(hf / "config.json", bin_dir)
    (bin_dir / "pytorch_model.bin").write_bytes(b"not read: torch is absent")
    for args in (("verify", str(hf)), ("convert", "hf-to-jax", str(bin_dir), str(root / "bin_out"))):
        err = cli(*args, expect=2).stderr.strip().splitlines()
        # (A host with libtpu but no TPU adds libtpu's own start-up warnings before it.)
        ours = [line for line in err if line.startswith("covenant-jax: error:")]
        if (
            len(ours) != 1
            or ours[0] != err[-1]
            or "needs torch" not in ours[0]
            or "pip install" not in ours[0]
            or any("Traceback" in line for line in err)
        ):
            raise CheckFailed(
                f"covenant-jax {' '.join(args)} without torch: expected one error line "
                f"naming torch and its install, no traceback; got {err}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="fail if torch is installed or imported (a TPU/GPU training install)",
    )
    parser.add_argument(
        "--tpu", action="store_true", help="fail if libtpu is missing (an install with the tpu extra)"
    )
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    has_torch = importlib.util.find_spec("torch") is not None
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    if args.no_torch and has_torch:
        print("check_install: --no-torch, but torch is installed in this environment", file=sys.stderr)
        return 1
    if args.tpu and not has_libtpu:
        print("check_install: --tpu, but libtpu is not installed (pip install -e '.[tpu]')", file=sys.stderr)
        return 1
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="covenant_check_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"checking the install of covenant_jax in {sys.prefix} (torch: {has_torch}, libtpu: {has_libtpu})")
    try:
        import_all(args.no_torch)
        hf, data = tiny_model(root)
        ckpt = to_jax(hf, root)
        train(ckpt, data, root)
        dpo(ckpt, root)
        to_hf(ckpt, hf, root)
        if has_libtpu:
            plan(root)
        else:
            print("  plan: skipped (libtpu not installed: pip install -e '.[tpu]')")
        if not has_torch:
            torch_verbs(hf, root)
    except CheckFailed as e:
        print(f" FAILED\ncheck_install: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("check_install: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
