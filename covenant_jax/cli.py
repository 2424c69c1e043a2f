"""``covenant-jax`` verbs. Thin: parse arguments, call the modules, print, set the exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covenant_jax.errors import USER_ERRORS, UserError

EXIT_BAD_INPUT = 2


def _mesh_arg(text: str | None):
    """``fsdp=4,tensor=2`` -> a mesh over all devices (omitted axes: 1, fsdp takes the rest)."""
    from covenant_jax.parallel.sharding import MeshError, make_mesh

    if not text:
        return make_mesh()
    try:
        shape = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise MeshError(f"--mesh {text!r}: expected axis=size pairs, e.g. fsdp=4,tensor=2") from None
    return make_mesh(shape)


def cmd_hf_to_jax(args) -> int:
    from covenant_jax.convert.api import hf_to_jax

    out = hf_to_jax(args.hf_dir, args.out_dir, dtype=args.dtype, mesh=_mesh_arg(args.mesh),
                    overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_jax_to_hf(args) -> int:
    from covenant_jax.convert.api import jax_to_hf

    out = jax_to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, mesh=_mesh_arg(args.mesh),
                    max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_verify(args) -> int:
    from covenant_jax.convert.verify import verify

    parity = verify(args.hf_dir, args.ckpt_dir, dtype=args.dtype, seq_len=args.seq_len,
                    tolerance=args.tolerance)
    print(parity.report())
    return 0 if parity.ok else 1


def load_recipe(config_path: str, overrides: list[str]):
    """ml_collections as it is: ``CONFIG[:arg]`` + ``--config.a.b=value`` overrides, locked."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UserError(f"unknown arguments {bad}; overrides look like --config.optim.lr=1e-5")
    argv = ["covenant-jax", f"--config={config_path}", *overrides]
    flag_values = flags.FlagValues()
    # sys_argv: which --config.* overrides to define (else it reads the process's sys.argv).
    config_flags.DEFINE_config_file("config", None, "recipe file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    try:
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError) as e:
        raise UserError(f"recipe {config_path}: {e}") from e
    return flag_values.config


def cmd_train(args) -> int:
    from covenant_jax.train.loop import train

    train(load_recipe(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covenant-jax", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    convert = verbs.add_parser("convert", help="convert checkpoints between HF and JAX")
    direction = convert.add_subparsers(dest="direction", required=True)
    h2j = direction.add_parser("hf-to-jax", help="HF folder (safetensors/.bin/.pt) -> Orbax params on a mesh")
    h2j.add_argument("hf_dir")
    h2j.add_argument("out_dir")
    h2j.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    h2j.add_argument("--mesh", help="e.g. fsdp=4,tensor=2 (default: fsdp over all devices)")
    h2j.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    h2j.set_defaults(fn=cmd_hf_to_jax)

    j2h = direction.add_parser("jax-to-hf", help="converted folder -> HF safetensors folder")
    j2h.add_argument("ckpt_dir")
    j2h.add_argument("out_dir")
    j2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the stored dtype")
    j2h.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size cap (GB)")
    j2h.add_argument("--mesh", help="mesh to restore onto, e.g. fsdp=8")
    j2h.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    j2h.set_defaults(fn=cmd_jax_to_hf)

    ver = verbs.add_parser("verify", help="logits parity vs transformers (PyTorch, CPU)")
    ver.add_argument("hf_dir")
    ver.add_argument("ckpt_dir", nargs="?", help="converted folder to check (default: HF_DIR itself)")
    ver.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ver.add_argument("--seq-len", type=int, default=64)
    ver.add_argument("--tolerance", type=float, help="max |Δlogits| (default in float32: 1e-4 + 1e-5 * max |logits|)")
    ver.set_defaults(fn=cmd_verify)

    tr = verbs.add_parser(
        "train", help="SFT / long-context training from a recipe",
        description="Train from an ml_collections recipe (configs/*.py). Any field can be "
                    "overridden: --config.optim.lr=1e-5 --config.train.steps=100. Resumes from "
                    "RUN_DIR/checkpoints when it holds one (train.resume).")
    tr.add_argument("config", help="recipe file, optionally FILE:ARG (e.g. configs/x.py:runlocal)")
    tr.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.key=value ...")
    tr.set_defaults(fn=cmd_train)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"covenant-jax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
