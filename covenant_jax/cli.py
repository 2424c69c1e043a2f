"""``covenant-jax`` verbs. Thin: parse arguments, call the modules, print, set the exit code."""

from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path
from covenant_jax import storage
from covenant_jax.errors import USER_ERRORS, UserError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a UserError (one line, exit 2), like every other bad input."""

    def error(self, message: str):
        verb = self.prog.removeprefix("covenant-jax").strip()
        raise UserError(f"{verb + ': ' if verb else ''}{message}")


def positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def positive_ints(text: str) -> list[int]:
    """``512,2048`` -> [512, 2048]"""
    try:
        return [positive_int(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers"
        ) from None


def unit_floats(text: str) -> list[float]:
    """``0,0.5,1`` -> [0.0, 0.5, 1.0], each in [0, 1]"""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers in [0, 1]")
    return values


def _mesh_arg(text: str | None):
    """``fsdp=4,tensor=2`` -> a mesh over all devices (omitted axes: 1, fsdp takes the rest)."""
    from covenant_jax.errors import MeshError
    from covenant_jax.parallel.sharding import make_mesh

    if not text:
        return make_mesh()
    try:
        shape = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise MeshError(f"--mesh {text!r}: expected axis=size pairs, e.g. fsdp=4,tensor=2") from None
    return make_mesh(shape)


def cmd_hf_to_jax(args) -> int:
    from covenant_jax.convert.api import hf_to_jax

    out = hf_to_jax(
        args.hf_dir, args.out_dir, dtype=args.dtype, mesh=_mesh_arg(args.mesh), overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0


def cmd_jax_to_hf(args) -> int:
    from covenant_jax.convert.api import jax_to_hf

    out = jax_to_hf(
        args.ckpt_dir,
        args.out_dir,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def cmd_lora_merge(args) -> int:
    from covenant_jax.convert.api import merge_adapter

    out = merge_adapter(
        args.base_dir, args.adapter_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0


def cmd_verify(args) -> int:
    from covenant_jax.convert.verify import verify

    parity = verify(
        args.hf_dir,
        args.ckpt_dir,
        dtype=args.dtype,
        batch=args.batch,
        seq_len=args.seq_len,
        factor=args.factor,
        tolerance=args.tolerance,
    )
    print(parity.report())
    return 0 if parity.ok else 1


def load_recipe(config_path: str, overrides: list[str]):
    """ml_collections as it is: ``CONFIG[:arg]`` + ``--config.a.b=value`` overrides, locked.

    A missing file, a syntax error, an error raised by the recipe's ``get_config`` and a bad
    override each become one line naming the recipe."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UserError(f"unknown arguments {bad}; overrides look like --config.optim.lr=1e-5")
    _check_recipe_file(config_path)
    argv = ["covenant-jax", f"--config={config_path}", *overrides]
    flag_values = flags.FlagValues()
    # sys_argv: which --config.* overrides to define (else it reads the process's sys.argv).
    config_flags.DEFINE_config_file(
        "config", None, "recipe file", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
        return flag_values.config
    except Exception as e:  # ml_collections wraps what get_config raised; find our own error in it
        cause = _user_error_in(e)
        if cause is not None:
            raise cause from None
        unknown = None
        if isinstance(e, (KeyError, AttributeError)) and overrides:  # ml_collections says only "'key'"
            unknown = _unknown_key(load_recipe(config_path, []), overrides)
        raise UserError(f"recipe {config_path}: {unknown or _one_line(e)}") from e


def _check_recipe_file(config_path: str) -> None:
    """Loads the recipe once on its own, so what goes wrong in it is named in one line
    (ml_collections reports it as text with a traceback inside)."""
    import importlib.util

    match = re.fullmatch(r"(.*?\.py)(?::(.*))?", config_path, re.S)
    path, arg = (Path(match.group(1)), match.group(2)) if match else (Path(config_path), None)
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file")
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as e:
        raise UserError(f"recipe {path}:{e.lineno}: {e.msg}") from None
    spec = importlib.util.spec_from_file_location(f"_covenant_recipe_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.get_config(*([] if arg is None else [arg]))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"recipe {config_path}: {type(e).__name__}: {_one_line(e)}") from e


def _user_error_in(e: BaseException | None) -> UserError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _one_line(e: BaseException) -> str:
    """The informative last line of a (possibly multi-line, traceback-carrying) message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _unknown_key(config, overrides: list[str]) -> str | None:
    """'unknown key model.rope.foo; model.rope has: ...' for the first override naming no field."""
    import ml_collections

    for override in overrides:
        path = override.removeprefix("--config.").split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if key not in node:
                parent = ".".join(path[:depth]) or "the recipe"
                return f"unknown key {'.'.join(path[: depth + 1])}; {parent} has: {', '.join(node.keys())}"
            node = node[key]
    return None


def cmd_train(args) -> int:
    from covenant_jax.train.loop import train
    from covenant_jax.train.preemption import EXIT_PREEMPTED

    summary = train(load_recipe(args.config, args.overrides))
    return EXIT_PREEMPTED if summary.preempted else 0


def cmd_export(args) -> int:
    from covenant_jax.train.model_io import export_checkpoint

    export_checkpoint(
        args.run_dir,
        step=args.step,
        out=args.out,
        merged_out=args.merged_out,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    return 0


def cmd_data_prepare(args) -> int:
    from covenant_jax.data import pipeline
    from covenant_jax.data.tokenizer import load_tokenizer
    from covenant_jax.train import loop, recipe

    cfg = load_recipe(args.config, args.overrides)
    recipe.check_fields(cfg)
    data = pipeline.build_pipeline(
        cfg.data, load_tokenizer(cfg.model.path), cache_dir=loop.data_cache_dir(cfg)
    )
    if pipeline.this_process()[0] == 0:
        print(data.report)
        for report, where in zip(data.report.sources, data.cache_locations):
            kept = (
                f"cached in {where}" if where else "in memory (not a file, or preference pairs: never cached)"
            )
            print(f"{report.name}: {kept}")
    return 0


def _eval_model(args):
    """(model, tokenizer); the tokenizer first: a missing one is found before loading weights."""
    from covenant_jax.data.tokenizer import load_tokenizer
    from covenant_jax.eval.common import load_eval_model

    tokenizer = load_tokenizer(args.model_dir)
    return load_eval_model(args.model_dir, args.dtype, _mesh_arg(args.mesh), args.yarn_factor), tokenizer


def _check_out(out: str | None) -> None:
    """``--out`` is checked before the model loads: an unwritable place fails now, not after the run."""
    if out:
        if storage.path(out).is_dir():
            raise UserError(f"--out {out} is a folder; give a file name")
        storage.check_writable(out, storage.path(out).parent)


def _report(result, out: str | None) -> int:
    print(result.table())
    if out:
        storage.path(out).write_text(result.to_json() + "\n")
        print(f"wrote {out}")
    return 0


def cmd_eval_perplexity(args) -> int:
    from covenant_jax.eval.perplexity import perplexity_from_jsonl

    _check_out(args.out)
    model, tokenizer = _eval_model(args)
    result = perplexity_from_jsonl(
        model,
        tokenizer,
        args.data,
        args.lengths,
        field=args.field,
        stride=args.stride,
        max_rows=args.max_rows,
        max_documents=args.max_documents,
        concatenate=args.concatenate,
        batch_size=args.batch_size,
        chunk=args.chunk,
        common_documents=args.common_documents,
        max_windows_per_document=args.max_windows_per_document,
        mesh=_mesh_arg(args.mesh),
    )
    return _report(result, args.out)


def cmd_eval_passkey(args) -> int:
    from covenant_jax.eval.passkey import passkey_eval

    _check_out(args.out)
    model, tokenizer = _eval_model(args)
    result = passkey_eval(
        model,
        tokenizer,
        args.lengths,
        args.depths,
        keys_per_cell=args.keys_per_cell,
        digits=args.digits,
        seed=args.seed,
        batch_size=args.batch_size,
        mesh=_mesh_arg(args.mesh),
    )
    return _report(result, args.out)


def _add_eval_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="HF folder or converted checkpoint (with its tokenizer)")
    p.add_argument(
        "--lengths", required=True, type=positive_ints, help="context lengths in tokens, e.g. 512,2048,8192"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", help="e.g. fsdp=8")
    p.add_argument("--yarn-factor", type=positive_float, help="apply YaRN with this factor (no training)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--out", help="also write the numbers as JSON here")


def _plan_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument(
        "--topology",
        default=None,
        help="v5p-256 (v4/v5p: TensorCores), v5e-64 / v6e-256 (chips), v5p:4x4x8, v5e:16x16, h100:8",
    )
    p.add_argument(
        "--json", action="store_true", default=None if not defaults else False, help="print the plan as JSON"
    )
    p.add_argument(
        "--no-search",
        action="store_true",
        default=None if not defaults else False,
        help="do not search for a variant that fits",
    )
    p.add_argument(
        "--max-candidates",
        type=positive_int,
        default=None if not defaults else 6,
        help="compiles the search may spend (default 6)",
    )
    p.add_argument(
        "--hbm-gib", type=positive_float, help="memory per device to plan against (default: the chip's HBM)"
    )
    p.add_argument(
        "--step-time",
        action="store_true",
        default=None if not defaults else False,
        help="also estimate the step time from the TPU compiler's cost model (two more "
        "compiles, of 1 and 2 layers with every loop unrolled); an estimate, not a measurement",
    )


def cmd_plan(args) -> int:
    from covenant_jax import plan as plan_lib

    # Options may come before or after CONFIG; what follows CONFIG also holds the --config.* overrides.
    late = Parser(prog="plan", add_help=False)
    _plan_options(late, defaults=False)
    after, overrides = late.parse_known_args(args.overrides)
    for key, value in vars(after).items():
        if value is not None:
            setattr(args, key, value)
    if not args.topology:
        raise UserError("plan needs --topology, e.g. --topology v5p-256")
    cfg = load_recipe(args.config, overrides)
    result = plan_lib.plan(
        cfg,
        args.topology,
        search=not args.no_search,
        max_candidates=args.max_candidates,
        hbm_bytes=int(args.hbm_gib * plan_lib.GiB) if args.hbm_gib else None,
        recipe_name=args.config,
        step_time=args.step_time,
        log=None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True)),
    )
    print(plan_lib.to_json(result) if args.json else plan_lib.report(result))
    return 0 if result.fits is not False else 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="covenant-jax", description=__doc__)
    dist = parser.add_argument_group(
        "multi-process (give these before the verb, the same on every process but --process-id; "
        "on TPU pods / SLURM / with JAX_COORDINATOR_ADDRESS they are detected)"
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address [COVENANT_COORDINATOR]")
    dist.add_argument("--num-processes", type=positive_int, metavar="N", help="[COVENANT_NUM_PROCESSES]")
    dist.add_argument("--process-id", type=int, metavar="I", help="0..N-1 [COVENANT_PROCESS_ID]")
    dist.add_argument(
        "--init-timeout",
        type=positive_int,
        metavar="S",
        help="seconds to wait for every process to connect (default 300) [COVENANT_INIT_TIMEOUT]",
    )
    dist.add_argument(
        "--heartbeat-timeout",
        type=positive_int,
        metavar="S",
        help="once running, seconds a silent (dead or hung) process may go before the others "
        "stop, naming it (default 100) [COVENANT_HEARTBEAT_TIMEOUT]",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    convert = verbs.add_parser("convert", help="convert checkpoints between HF and JAX")
    direction = convert.add_subparsers(dest="direction", required=True)
    h2j = direction.add_parser("hf-to-jax", help="HF folder (safetensors/.bin/.pt) -> Orbax params on a mesh")
    h2j.add_argument("hf_dir")
    h2j.add_argument("out_dir")
    h2j.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    h2j.add_argument(
        "--mesh",
        help="the mesh the stored chunks are cut for, e.g. fsdp=4,tensor=2 "
        "(default: fsdp over all devices); any mesh can restore it",
    )
    h2j.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    h2j.set_defaults(fn=cmd_hf_to_jax)

    j2h = direction.add_parser("jax-to-hf", help="converted folder -> HF safetensors folder")
    j2h.add_argument("ckpt_dir")
    j2h.add_argument("out_dir")
    j2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the stored dtype")
    j2h.add_argument(
        "--max-shard-gb", type=positive_float, default=5.0, help="safetensors shard size cap (GB)"
    )
    j2h.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    j2h.set_defaults(fn=cmd_jax_to_hf)

    merge = direction.add_parser(
        "lora-merge",
        help="base folder + PEFT LoRA adapter folder -> merged HF "
        "safetensors folder (W + scale · B·A, as PEFT's merge_and_unload)",
    )
    merge.add_argument("base_dir", help="the adapter's base model: HF or converted folder")
    merge.add_argument(
        "adapter_dir", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    merge.add_argument("out_dir")
    merge.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: the base's dtype"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    merge.set_defaults(fn=cmd_lora_merge)

    ver = verbs.add_parser("verify", help="logits parity vs transformers (PyTorch, CPU)")
    ver.add_argument("hf_dir")
    ver.add_argument("ckpt_dir", nargs="?", help="converted folder to check (default: HF_DIR itself)")
    ver.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ver.add_argument("--batch", type=positive_int, default=2)
    ver.add_argument(
        "--seq-len",
        type=positive_int,
        default=64,
        help="tokens per row (at most the model's max_position_embeddings)",
    )
    ver.add_argument(
        "--factor",
        type=positive_float,
        default=2.0,
        help="pass when ours is within FACTOR x transformers' own distance from its float64 "
        "logits (default %(default)s)",
    )
    ver.add_argument(
        "--tolerance", type=positive_float, help="a fixed limit on max |Δlogits| from float64 instead"
    )
    ver.set_defaults(fn=cmd_verify)

    ev = verbs.add_parser("eval", help="long-context evaluation: perplexity by length, passkey")
    kinds = ev.add_subparsers(dest="kind", required=True)
    ppl = kinds.add_parser("perplexity", help="sliding-window perplexity for a list of context lengths")
    _add_eval_model_args(ppl)
    ppl.add_argument("data", help='JSONL of {"text": ...} documents')
    ppl.add_argument("--stride", type=positive_int, help="window stride (default: the length)")
    ppl.add_argument("--field", default="text")
    ppl.add_argument("--max-rows", type=positive_int)
    ppl.add_argument(
        "--max-documents", type=positive_int, help="first N documents long enough for each length"
    )
    ppl.add_argument("--concatenate", action="store_true", help="join all documents into one stream")
    ppl.add_argument(
        "--common-documents",
        action="store_true",
        help="score every length on the same documents (those long enough for the longest)",
    )
    ppl.add_argument("--max-windows-per-document", type=positive_int)
    ppl.add_argument("--chunk", type=positive_int, default=1024, help="positions per logits chunk")
    ppl.set_defaults(fn=cmd_eval_perplexity)
    pk = kinds.add_parser("passkey", help="passkey retrieval accuracy over lengths x depths")
    _add_eval_model_args(pk)
    pk.add_argument("--depths", default=[0.0, 0.5, 1.0], type=unit_floats, help="relative needle depths")
    pk.add_argument("--keys-per-cell", type=positive_int, default=2)
    pk.add_argument("--digits", type=positive_int, default=5)
    pk.add_argument("--seed", type=int, default=0)
    pk.set_defaults(fn=cmd_eval_passkey)

    tr = verbs.add_parser(
        "train",
        help="SFT / long-context training from a recipe",
        description="Train from an ml_collections recipe (configs/*.py). Any field can be "
        "overridden: --config.optim.lr=1e-5 --config.train.steps=100. Resumes from "
        "RUN_DIR/checkpoints when it holds one (train.resume).",
    )
    tr.add_argument("config", help="recipe file, optionally FILE:ARG (e.g. configs/x.py:runlocal)")
    tr.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.key=value ...")
    tr.set_defaults(fn=cmd_train)

    ex = verbs.add_parser(
        "export",
        help="export a run's checkpoint step: HF folder, or PEFT adapter (+ merged weights)",
        description="Export checkpoint step N of RUN_DIR (default: the newest) as the run's own "
        "export would be: an HF safetensors folder, or for a LoRA run a PEFT adapter folder "
        "(--merged-out: also the merged weights). Reads the step's own recipe and checks the "
        "restored weights against the digests saved with it.",
    )
    ex.add_argument("run_dir", help="a train run's folder (train.run_dir)")
    ex.add_argument("--step", type=positive_int, help="checkpoint step (default: the newest)")
    ex.add_argument("--out", help="output folder (default: RUN_DIR/export-stepN)")
    ex.add_argument("--merged-out", help="LoRA runs: also write the merged weights (an HF folder) here")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the recipe's")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ex.set_defaults(fn=cmd_export)

    data = verbs.add_parser("data", help="prepare a recipe's data ahead of a job")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    prep = data_verbs.add_parser(
        "prepare",
        help="render and tokenise a recipe's data into its cache; print the report",
        description="Render, tokenise and cache every file source of the recipe (in parallel "
        "processes, data.workers; with --num-processes each process prepares its "
        "share) where training will look for it: data.cache_dir, else "
        "RUN_DIR/data_cache. Training then starts from the cache.",
    )
    prep.add_argument("config", help="recipe file, optionally FILE:ARG")
    prep.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.key=value ...")
    prep.set_defaults(fn=cmd_data_prepare)

    pl = verbs.add_parser(
        "plan",
        help="will a recipe fit a TPU pod? compile the train step ahead of time",
        description="Compile the recipe's train step for a TPU topology from abstract shapes (no "
        "weights, no TPU; needs libtpu: pip install -e '.[tpu]') and report memory per "
        "device, whether it fits HBM, and FLOPs; when it does not fit, try remat / "
        "micro-batches / mesh / loss-chunk changes and report the first that fits; "
        "with --step-time, the compiler's cost-model estimate of the step time. "
        "GPU targets (h100:8) get an analytic estimate. Exit 1 when it does not fit.",
    )
    pl.add_argument("config", help="recipe file, optionally FILE:ARG (e.g. configs/covenant72b_sft.py:8k)")
    _plan_options(pl, defaults=True)
    pl.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.key=value ...")
    pl.set_defaults(fn=cmd_plan)

    return parser


# Storage failures are the user's to fix (space, quota, permissions), not bugs: one line each.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or a size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_failure(e: BaseException) -> str | None:
    """One line for an exception caused by full or unwritable storage (OSError, or TensorStore's
    errors, which carry ``os_error_code``), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            return f"storage: {_STORAGE_ERRNOS[e.errno]}{where}"
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code and int(code.group(1)) in _STORAGE_ERRNOS:
            path = re.search(r'"(/[^"]+)"', str(e))
            return f"storage: {_STORAGE_ERRNOS[int(code.group(1))]}" + (f" ({path.group(1)})" if path else "")
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    from covenant_jax.parallel import distributed  # no JAX import at module level

    try:
        args = build_parser().parse_args(argv)
    except UserError as e:
        print(f"covenant-jax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        # Before the verb touches JAX; a no-op for a single process (flags, env and cluster unset).
        distributed.initialize(
            args.coordinator, args.num_processes, args.process_id, args.init_timeout, args.heartbeat_timeout
        )
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"covenant-jax: error: {e}", file=sys.stderr)
        distributed.abandon(EXIT_BAD_INPUT)  # multi-process: do not wait on the peers
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one before training starts
        print("covenant-jax: interrupted; completed checkpoints are intact", file=sys.stderr)
        distributed.abandon(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BaseException as e:
        storage = storage_failure(e) if isinstance(e, Exception) else None
        if storage is not None:
            print(
                f"covenant-jax: error: {storage}; nothing partial was published (earlier complete "
                "outputs and checkpoints are intact)",
                file=sys.stderr,
            )
            distributed.abandon(EXIT_BAD_INPUT)
            return EXIT_BAD_INPUT
        if distributed.is_multiprocess():  # a bug or a dead peer: say which, then exit now
            import traceback

            traceback.print_exc()
            if type(e).__name__ == "JaxRuntimeError":
                from jax import process_index as jax_process_index

                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(
                    f"covenant-jax: error: process {jax_process_index()}: a collective with the "
                    f"other processes failed ({first}); a peer process {distributed.PEER_LOST}",
                    file=sys.stderr,
                )
            distributed.abandon(distributed.EXIT_PEER_LOST)
        raise


if __name__ == "__main__":
    sys.exit(main())
