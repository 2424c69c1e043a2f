#!/usr/bin/env python
"""Conversion speed and memory benchmark: covenant-jax hf-to-jax / jax-to-hf vs cp and transformers.

    python tools/bench_convert.py                              # Llama-3.2-1B shapes, fp32, ~6 GB
    python tools/bench_convert.py --layers 2 --hidden 512      # small, for a quick check
    python tools/bench_convert.py --json bench.json --keep

1. Writes a random HF checkpoint (LlamaForCausalLM, untied, sharded safetensors + index +
   config.json) tensor by tensor, so the generator never holds the model.
2. Runs each contender in a fresh subprocess under ``/usr/bin/time -v`` (else ``wait4`` rusage),
   every contender reading its input cold:
     cp            ``cp -r HF OUT`` (coreutils: ``copy_file_range``, a copy inside the kernel)
     py-copy       the same files through user memory: ``readinto`` a reused 64 MB buffer, then
                   ``write`` -- the floor for any converter that looks at the bytes
     transformers  ``AutoModelForCausalLM.from_pretrained(HF, dtype=float32).save_pretrained(OUT)``
     hf-to-jax     ``covenant-jax convert hf-to-jax HF CKPT``
     jax-to-hf     ``covenant-jax convert jax-to-hf CKPT OUT``
   ``--cold input`` (default) evicts the checkpoint files (the input and every earlier output)
   from the page cache (``posix_fadvise(DONTNEED)`` after a sync); programs and libraries stay
   cached, as on any machine that has run Python before. ``--cold all`` drops the whole page
   cache (root only), so Python's imports (~0.4 GB of libraries) are read from disk too.
   ``--repeat N`` runs the contenders N times, round-robin in a shuffled order (the disk's speed
   drifts: on a shared VM disk a contender's wall time varies by +-20% from run to run) and
   reports medians.
   Wall time includes process start-up and imports, plus an fsync of every output file after the
   command (covenant's safetensors writer fsyncs, cp and safetensors do not; this keeps it fair).
   Peak RSS is the kernel's high-water mark (``ru_maxrss``); its anonymous / file-backed split
   is polled from /proc every 20 ms (memory-mapped checkpoint pages count as file-backed RSS:
   they are reclaimable page cache, not allocations).
3. Checks that jax-to-hf's output equals the input bit for bit (tensor by tensor, streaming),
   and prints a markdown table with the targets (peak RSS < 25% of the checkpoint; wall within
   1.5x of the plain copy). ``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covenant_jax.config import ModelConfig  # noqa: E402
from covenant_jax.convert import keymap  # noqa: E402
from covenant_jax.convert.hf_files import open_weights  # noqa: E402
from covenant_jax.convert.safetensors_io import DTYPES, write_safetensors  # noqa: E402

GB = 1e9
RSS_TARGET = 0.25  # peak RSS / checkpoint bytes
WALL_TARGET = 1.5  # wall / cp wall
TIME_BIN = "/usr/bin/time"


# ---- the random checkpoint --------------------------------------------------------------------


def hf_config(args) -> dict:
    head_dim = args.head_dim or args.hidden // args.heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": args.dtype,
    }


def hf_order(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' state-dict order: embedding, layer by layer, final norm, lm_head."""
    maps = keymap.tensor_maps(cfg)
    out = [(m.hf_name(), m.hf_shape) for m in maps if not m.stacked and m.path == ("embed",)]
    for layer in range(cfg.num_hidden_layers):
        out += [(m.hf_name(layer), m.hf_shape) for m in maps if m.stacked]
    out += [(m.hf_name(), m.hf_shape) for m in maps if not m.stacked and m.path != ("embed",)]
    assert dict(out) == keymap.expected_hf_shapes(cfg)
    return out


def make_checkpoint(folder: Path, args) -> int:
    """Writes the sharded checkpoint; returns the weight files' total bytes."""
    folder.mkdir(parents=True)
    config = hf_config(args)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = ModelConfig.from_hf_dict(config)
    dtype = np.dtype(DTYPES["BF16" if args.dtype == "bfloat16" else "F32"])
    tensors = hf_order(cfg)
    sizes = [int(np.prod(s)) * dtype.itemsize for _, s in tensors]
    total = sum(sizes)
    # Cut into --shards contiguous groups of about equal bytes.
    groups, acc = [[] for _ in range(args.shards)], 0
    for (name, shape), size in zip(tensors, sizes):
        groups[min(int(acc * args.shards // total), args.shards - 1)].append((name, shape, dtype))
        acc += size
    groups = [g for g in groups if g]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    rng = np.random.default_rng(args.seed)

    def produce(group):
        for _, shape, dt in group:
            yield (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(dt)

    for name, group in zip(names, groups):
        write_safetensors(folder / name, group, produce(group))
    weight_map = {t: name for name, group in zip(names, groups) for t, _, _ in group}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}) + "\n"
    )
    return sum((folder / n).stat().st_size for n in names)


# ---- measuring one contender ------------------------------------------------------------------


def drop_caches() -> bool:
    """sync + drop the page cache (needs root and a writable /proc/sys); True if it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(*folders: Path) -> bool:
    """sync + evict the folders' files from the page cache (any user); True: it always works."""
    os.sync()
    for path in (p for folder in folders for p in folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


PY_COPY = """import os, sys
src, dst = sys.argv[1], sys.argv[2]
buf = memoryview(bytearray(64 << 20))
for root, _, files in os.walk(src):
    out_root = os.path.join(dst, os.path.relpath(root, src))
    os.makedirs(out_root, exist_ok=True)
    for name in files:
        fi = open(os.path.join(root, name), "rb", buffering=0)
        fo = open(os.path.join(out_root, name), "wb", buffering=0)
        while n := fi.readinto(buf):
            view = buf[:n]
            while view:
                view = view[fo.write(view):]
        fi.close()
        fo.close()
"""


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class Poller(threading.Thread):
    """Max over time of the process tree's summed VmRSS / RssAnon / RssFile (kB)."""

    def __init__(self, pid: int, skip: int | None):
        super().__init__(daemon=True)
        self.pid, self.skip, self.stop = pid, skip, threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}

    def run(self):
        while not self.stop.wait(0.02):
            total = dict.fromkeys(self.peak, 0)
            for p in _tree(self.pid):
                if p == self.skip:
                    continue  # /usr/bin/time itself
                for k, v in _rss_kb(p).items():
                    total[k] += v
            for k in self.peak:
                self.peak[k] = max(self.peak[k], total[k])


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*") if folder.exists() else []):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def measure(name: str, argv: list[str], out: Path, workdir: Path, env: dict) -> dict:
    use_time = os.access(TIME_BIN, os.X_OK)
    time_file = workdir / f"{name}.time.txt"
    log_file = workdir / f"{name}.log"
    full = [TIME_BIN, "-v", "-o", str(time_file), *argv] if use_time else argv
    shown = " ".join(a if "\n" not in a else "<script>" for a in argv)
    print(f"[bench] {name}: {shown}", flush=True)
    with open(log_file, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        poller = Poller(proc.pid, proc.pid if use_time else None)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        cmd_s = time.perf_counter() - t0
        poller.stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"[bench] {name} failed with exit code {proc.returncode}:\n{tail}")
    t1 = time.perf_counter()
    fsync_tree(out)
    flush_s = time.perf_counter() - t1
    maxrss_kb, source = usage.ru_maxrss, "wait4"
    if use_time:
        for line in time_file.read_text().splitlines():
            if "Maximum resident set size" in line:
                maxrss_kb, source = int(line.split(":")[-1]), "/usr/bin/time -v"
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    result = {
        "contender": name,
        "command": argv,
        "cmd_s": cmd_s,
        "flush_s": flush_s,
        "wall_s": cmd_s + flush_s,
        "peak_rss_bytes": maxrss_kb * 1024,
        "peak_rss_source": source,
        "polled_peak_anon_bytes": poller.peak["RssAnon"] * 1024,
        "polled_peak_file_bytes": poller.peak["RssFile"] * 1024,
        "polled_peak_rss_bytes": poller.peak["VmRSS"] * 1024,
        "output_bytes": out_bytes,
    }
    print(
        f"[bench] {name}: {result['wall_s']:.1f}s (flush {flush_s:.1f}s), "
        f"peak RSS {result['peak_rss_bytes'] / GB:.2f} GB "
        f"(anon {result['polled_peak_anon_bytes'] / GB:.2f}, file {result['polled_peak_file_bytes'] / GB:.2f})",
        flush=True,
    )
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, with the largest peak RSS of all runs."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    for key in (
        "peak_rss_bytes",
        "polled_peak_anon_bytes",
        "polled_peak_file_bytes",
        "polled_peak_rss_bytes",
    ):
        result[key] = max(r[key] for r in runs)
    result["walls_s"] = [r["wall_s"] for r in runs]
    return result


# ---- bit-identity check -----------------------------------------------------------------------


def compare(a_dir: Path, b_dir: Path, chunk: int = 64 << 20) -> list[str]:
    """Problems found comparing two HF folders' tensors bit for bit (empty: identical)."""
    a, b = open_weights(a_dir), open_weights(b_dir)
    problems = []
    if set(a.keys()) != set(b.keys()):
        problems.append(
            f"keys differ: only in input {sorted(set(a.keys()) - set(b.keys()))[:5]}, "
            f"only in output {sorted(set(b.keys()) - set(a.keys()))[:5]}"
        )
    for key in sorted(set(a.keys()) & set(b.keys())):
        if a.shape(key) != b.shape(key) or a.dtype(key) != b.dtype(key):
            problems.append(f"{key}: {a.dtype(key)}{a.shape(key)} vs {b.dtype(key)}{b.shape(key)}")
            continue
        x = np.asarray(a.tensor(key)).reshape(-1).view(np.uint8)
        y = np.asarray(b.tensor(key)).reshape(-1).view(np.uint8)
        if not all(np.array_equal(x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.size, chunk)):
            problems.append(f"{key}: bytes differ")
    return problems


# ---- report -----------------------------------------------------------------------------------


def table(results: list[dict], ckpt_bytes: int) -> str:
    cp_wall = next(r["wall_s"] for r in results if r["contender"] == "cp")
    lines = [
        "| contender | wall s | runs s | GB/s | peak RSS GB | RSS % of ckpt | peak anon GB (polled) "
        "| peak file-backed GB (polled) | wall / cp | RSS < 25% | wall <= 1.5x cp |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        covenant = r["contender"] in ("hf-to-jax", "jax-to-hf")
        rss_met = "met" if r["rss_fraction"] < RSS_TARGET else "not met"
        wall_met = "met" if r["wall_vs_cp"] <= WALL_TARGET else "not met"
        lines.append(
            f"| {r['contender']} | {r['wall_s']:.1f} | {' '.join(f'{w:.1f}' for w in r['walls_s'])} "
            f"| {r['gb_per_s']:.2f} | {r['peak_rss_bytes'] / GB:.2f} "
            f"| {100 * r['rss_fraction']:.1f}% | {r['polled_peak_anon_bytes'] / GB:.2f} "
            f"| {r['polled_peak_file_bytes'] / GB:.2f} | {r['wall_s'] / cp_wall:.2f}x "
            f"| {rss_met if covenant else '—'} | {wall_met if covenant else '—'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    ap.add_argument("--keep", action="store_true", help="keep --workdir (default: removed at the end)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--hf", type=Path, help="an existing HF folder to convert (default: generate one)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all contenders; medians reported")
    ap.add_argument(
        "--cold",
        choices=["input", "all"],
        default="input",
        help="evict the checkpoint files from the page cache, or drop it all (root)",
    )
    ap.add_argument(
        "--only",
        default="cp,py-copy,transformers,hf-to-jax,jax-to-hf",
        help="comma-separated contenders to run (cp is always run: it is the baseline)",
    )
    args = ap.parse_args(argv)

    work = args.workdir.absolute()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    only = {"cp", *args.only.split(",")}
    hf, ckpt = (args.hf.absolute() if args.hf else work / "hf"), work / "ckpt"
    bin_dir = Path(sys.executable).parent
    cli = str(bin_dir / "covenant-jax") if (bin_dir / "covenant-jax").exists() else None
    cli_argv = [cli] if cli else [sys.executable, "-m", "covenant_jax.cli"]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Conversion is host work; with jax[tpu] installed on a host without a TPU, JAX would first
    # try (and fail) to start the TPU runtime, ~2 s. Override with JAX_PLATFORMS=... if wanted.
    env.setdefault("JAX_PLATFORMS", "cpu")
    try:
        t0 = time.perf_counter()
        ckpt_bytes = (
            sum(p.stat().st_size for p in hf.glob("*.safetensors")) if args.hf else make_checkpoint(hf, args)
        )
        gen_s = time.perf_counter() - t0
        print(f"[bench] checkpoint: {ckpt_bytes / GB:.2f} GB in {gen_s:.1f}s at {hf}", flush=True)

        tf_script = (
            "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "m.save_pretrained(sys.argv[2])\n"
        )
        contenders = [  # (name, command, output)
            ("cp", ["cp", "-r", str(hf), str(work / "cp_out")], work / "cp_out"),
            ("py-copy", [sys.executable, "-c", PY_COPY, str(hf), str(work / "py_out")], work / "py_out"),
            (
                "transformers",
                [sys.executable, "-c", tf_script, str(hf), str(work / "tf_out")],
                work / "tf_out",
            ),
            ("hf-to-jax", [*cli_argv, "convert", "hf-to-jax", str(hf), str(ckpt)], ckpt),
            (
                "jax-to-hf",
                [*cli_argv, "convert", "jax-to-hf", str(ckpt), str(work / "roundtrip")],
                work / "roundtrip",
            ),
        ]
        runs: dict[str, list[dict]] = {}
        dropped = []
        # After the first round the order is shuffled (hf-to-jax stays just before jax-to-hf,
        # which reads its output), so no contender always runs right after the same neighbour:
        # on a cloud disk a heavy writer can slow whatever follows it.
        groups = [[c] for c in contenders[:3]] + [contenders[3:]]
        shuffler = random.Random(args.seed)
        for round_ in range(args.repeat):
            order = list(groups)
            if round_:
                shuffler.shuffle(order)
            for name, cmd, out in (c for group in order for c in group):
                if name not in only:
                    continue
                shutil.rmtree(out, ignore_errors=True)  # the last round's hf-to-jax output stays
                # --cold input: every checkpoint file (this input, earlier outputs) leaves the cache,
                # so each contender starts with the same free memory; libraries stay cached.
                dropped.append(drop_caches() if args.cold == "all" else evict(hf, work))
                runs.setdefault(name, []).append(measure(name, cmd, out, work, env))
                if name in ("cp", "py-copy", "transformers"):
                    shutil.rmtree(out)  # keep the disk footprint down
        results = [median_run(r) for r in runs.values()]

        # The fixed cost inside the covenant rows: interpreter + jax/flax/orbax imports.
        startup = (
            measure(
                "startup",
                [sys.executable, "-c", "import covenant_jax.convert.api"],
                work / "startup_out",
                work,
                env,
            )
            if only & {"hf-to-jax", "jax-to-hf"}
            else None
        )

        identical = None
        if "jax-to-hf" in only:
            problems = compare(hf, work / "roundtrip")
            identical = not problems
            print(
                "[bench] jax-to-hf output vs input: "
                + ("bit-identical" if identical else "DIFFERENT:\n  " + "\n  ".join(problems[:20])),
                flush=True,
            )

        cp_wall = results[0]["wall_s"]
        for r in results:
            r["gb_per_s"] = ckpt_bytes / GB / r["wall_s"]
            r["rss_fraction"] = r["peak_rss_bytes"] / ckpt_bytes
            r["anon_fraction"] = r["polled_peak_anon_bytes"] / ckpt_bytes
            r["wall_vs_cp"] = r["wall_s"] / cp_wall

        shape = (
            f"{hf} as given"
            if args.hf
            else (
                f"hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
                f"ffn {args.ffn}, vocab {args.vocab}, untied, {args.dtype}, {args.shards} shards"
            )
        )
        caches = (
            (
                "input evicted from the page cache before each run"
                if args.cold == "input"
                else "whole page cache dropped before each run (cold imports too)"
            )
            if all(dropped)
            else "page cache could NOT be dropped for every run: reads may be warm"
        )
        caches += f"; median of {args.repeat} round-robin runs" if args.repeat > 1 else "; one run each"
        print(
            f"\nCheckpoint: {ckpt_bytes / GB:.2f} GB ({shape}); {caches}; "
            f"{os.cpu_count()} CPUs, {platform.machine()}."
        )
        print("Wall includes start-up/imports and an fsync of the outputs; GB/s = checkpoint bytes / wall.\n")
        print(table(results, ckpt_bytes))
        if startup:
            print(
                f"\nStart-up alone (`python -c 'import covenant_jax.convert.api'`, warm cache): "
                f"{startup['wall_s']:.1f} s, peak RSS {startup['peak_rss_bytes'] / GB:.2f} GB "
                "(included in the covenant rows)."
            )
        if identical is not None:
            print(f"\njax-to-hf output bit-identical to the input: {'yes' if identical else 'NO'}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "checkpoint_bytes": ckpt_bytes,
                        "shape": shape,
                        "generate_s": gen_s,
                        "cold": args.cold,
                        "repeat": args.repeat,
                        "page_cache_dropped": dropped,
                        "runs": runs,
                        "targets": {"rss_fraction_below": RSS_TARGET, "wall_vs_cp_at_most": WALL_TARGET},
                        "roundtrip_bit_identical": identical,
                        "results": results,
                        "startup": startup,
                    },
                    indent=2,
                )
                + "\n"
            )
        return 0 if identical in (None, True) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] kept {work}")


if __name__ == "__main__":
    sys.exit(main())
