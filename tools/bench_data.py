#!/usr/bin/env python
"""Data pipeline speed on the real material, side by side with the code path before preparation
in processes and the cache (commit BASELINE): setup, steady state, and a 1M-row mixture's warm
start and host memory.

    python tools/bench_data.py                   # side by side: ~4 min on 2 cores
    python tools/bench_data.py --million         # and the 1M-row mixture (built and prepared
                                                 # once, under material/bench: ~1 h on 2 cores)
    python tools/bench_data.py --rows 1000 --json out.json

Material (tools/fetch_material.py): SmolLM2-135M-Instruct's tokenizer and chat template,
material/sharegpt.jsonl (format sharegpt, role_map chatgpt/bing/bard -> assistant), and
material/long_text.jsonl (format text, overlength "split").

Side by side, per case, in this process: `baseline` is BASELINE's `build_pipeline` (loaded from
git; one process renders and tokenises every row); `cold` is today's with an empty cache
(up to data.workers processes prepare and write the cache: this one, and helpers once it has
prepared for prepare.SPAWN_AFTER_S; the table's `processes`); `warm` reads that cache. Setup = the
build_pipeline call; rows/s = rows / setup; CPU s = this process and its preparation processes
(rows / CPU s is the rate per core). Their first 20 batches are checked bit for bit equal; steady
state = the next --batches batches, in tokens/s (every slot of the [batch, seq_len] arrays).

--million builds a mixture of real rows repeated (see `million_rows`), prepares it cold (this is
the long part), then, each in a fresh process (what a restarted job does), starts from the warm
cache: time to the first batch (imports, tokenizer, build_pipeline, first batch), steady state,
and the process's RSS after 200 batches, for the whole mixture and for a 10x smaller one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASELINE = "2d7c008"  # The last commit before preparation in processes and the cache.
MATERIAL = REPO / "material"
TOKENIZER = MATERIAL / "smollm2-135m-instruct"
SHAREGPT = MATERIAL / "sharegpt.jsonl"
LONG_TEXT = MATERIAL / "long_text.jsonl"
BENCH = MATERIAL / "bench"
ROLE_MAP = {"chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "user": "user"}
# Rows of the 1M-row mixture: single exchanges and whole conversations.
MILLION = {"exchanges": 900_000, "conversations": 100_000}


def cases(rows: int) -> list[dict]:
    sharegpt = dict(path=str(SHAREGPT), format="sharegpt", role_map=ROLE_MAP, max_rows=rows)
    long_text = dict(path=str(LONG_TEXT), format="text")
    return [
        dict(name="sharegpt", sources=[sharegpt], seq_len=2048, overlength="truncate"),
        dict(name="long_text", sources=[long_text], seq_len=32768, overlength="split"),
    ]


def data_config(case: dict, **extra) -> dict:
    return dict(
        sources=case["sources"],
        template="tokenizer",
        seq_len=case["seq_len"],
        batch_size=8,
        overlength=case["overlength"],
        epochs=0,
        **extra,
    )


def baseline_pipeline():
    """BASELINE's pipeline.py as a module (it imports today's formats/sources/templates, which
    this change left alone)."""
    text = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASELINE}:covenant_jax/data/pipeline.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "baseline_pipeline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def cpu_seconds() -> float:
    """This process and its finished children (the preparation processes, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_build(build, cfg, tokenizer, **kw):
    t0, c0 = time.perf_counter(), cpu_seconds()
    data = build(cfg, tokenizer, process_index=0, process_count=1, **kw)
    return data, time.perf_counter() - t0, cpu_seconds() - c0


def steady(data, batches: int, skip: int = 20) -> dict:
    it = iter(data.train)
    t0 = time.perf_counter()
    first = [next(it) for _ in range(skip)]
    first_s = (time.perf_counter() - t0) / skip
    t0 = time.perf_counter()
    real = sum(int((next(it)["segment_ids"] > 0).sum()) for _ in range(batches))
    seconds = time.perf_counter() - t0
    b = first[0]["tokens"]
    slots = batches * b.size
    return dict(first=first, batch_s=first_s, tokens_per_s=slots / seconds, fill=real / slots)


def same_batches(a: list, b: list) -> bool:
    import numpy as np  # pylint: disable=g-import-not-at-top

    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def side_by_side(case: dict, tokenizer, batches: int, workers: int) -> list[dict]:
    from covenant_jax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top

    old = baseline_pipeline()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        contenders = [
            ("baseline", old.build_pipeline, data_config(case), {}),
            ("cold", pipeline.build_pipeline, data_config(case, workers=workers), {"cache_dir": cache_dir}),
            ("warm", pipeline.build_pipeline, data_config(case, workers=workers), {"cache_dir": cache_dir}),
        ]
        reference = None
        for name, build, cfg, kw in contenders:
            processes = prepare.auto_workers(workers) if name == "cold" else 1
            data, setup_s, cpu_s = timed_build(build, cfg, tokenizer, **kw)
            rep = data.report.sources[0]
            s = steady(data, batches)
            reference = reference or s["first"]
            rows.append(
                dict(
                    case=case["name"],
                    seq_len=case["seq_len"],
                    path=name,
                    processes=processes,
                    rows=rep.rows,
                    samples=rep.train,
                    tokens=rep.tokens,
                    setup_s=setup_s,
                    cpu_s=cpu_s,
                    rows_per_s=rep.rows / setup_s,
                    rows_per_cpu_s=rep.rows / cpu_s,
                    tokens_per_s=s["tokens_per_s"],
                    fill=s["fill"],
                    same_batches=same_batches(reference, s["first"]),
                )
            )
            print(
                f"  {case['name']} {name}: {processes} process(es), setup {setup_s:.1f} s ({cpu_s:.1f} cpu s), "
                f"{rows[-1]['rows_per_s']:,.0f} rows/s, {s['tokens_per_s']:,.0f} tokens/s steady, "
                f"same batches: {rows[-1]['same_batches']}",
                flush=True,
            )
    return rows


def table(results: list[dict]) -> str:
    head = (
        "| case | path | processes | rows | samples | setup s | CPU s | rows/s | rows / CPU s | vs baseline "
        "| steady tokens/s | fill | same batches |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["case"]: r for r in results if r["path"] == "baseline"}
    for r in results:
        speedup = r["rows_per_s"] / base[r["case"]]["rows_per_s"]
        lines.append(
            f"| {r['case']} ({r['seq_len']}) | {r['path']} | {r['processes']} | {r['rows']:,} | {r['samples']:,} "
            f"| {r['setup_s']:.2f} | {r['cpu_s']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {r['rows_per_cpu_s']:,.0f} | {speedup:,.1f}x | {r['tokens_per_s']:,.0f} "
            f"| {r['fill']:.2f} | {r['same_batches']} |"
        )
    return "\n".join(lines)


# --- the 1M-row mixture ------------------------------------------------------------------------


def million_rows(out: Path) -> dict[str, Path]:
    """Real ShareGPT rows repeated: `exchanges` = the first exchange (a user turn and the reply)
    of each conversation, `conversations` = whole conversations; both cycle through the 17,545
    conversations, copy k's first user turn prefixed with "[k] " so that no two rows are equal."""
    files = {name: out / f"{name}.jsonl" for name in MILLION}
    if all(f.exists() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    convs = [json.loads(line)["conversations"] for line in open(SHAREGPT)]
    exchanges = [
        c[:2]
        for c in convs
        if len(c) >= 2
        and c[0]["from"] in ("human", "user")
        and ROLE_MAP.get(c[1]["from"], c[1]["from"]) in ("gpt", "assistant")
    ]
    for name, pool in (("exchanges", exchanges), ("conversations", convs)):
        tmp = files[name].with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i in range(MILLION[name]):
                turns = [dict(t) for t in pool[i % len(pool)]]
                turns[0]["value"] = f"[{i // len(pool)}] {turns[0]['value']}"
                f.write(json.dumps({"conversations": turns}) + "\n")
        tmp.rename(files[name])
    return files


def million_config(files: dict[str, Path], scale: float, workers: int) -> dict:
    sources = [
        dict(
            path=str(files[n]),
            format="sharegpt",
            role_map=ROLE_MAP,
            weight=MILLION[n],
            max_rows=int(MILLION[n] * scale),
        )
        for n in MILLION
    ]
    return dict(
        sources=sources,
        template="tokenizer",
        seq_len=2048,
        batch_size=8,
        eval_count=500,
        workers=workers,
        cache_dir=str(BENCH / "cache"),
    )


def measure_warm(cfg: dict, batches: int) -> dict:
    """In a fresh process: from interpreter start to the first batch, then RSS after batches."""
    started = time.perf_counter()
    import transformers  # pylint: disable=g-import-not-at-top

    from covenant_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    imports = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    loaded = time.perf_counter()
    data = pipeline.build_pipeline(cfg, tokenizer, process_index=0, process_count=1)
    built = time.perf_counter()
    it = iter(data.train)
    next(it)
    first = time.perf_counter()
    for _ in range(batches):
        next(it)
    steady_s = time.perf_counter() - first
    # Resident memory now (VmRSS: RssAnon, the process's own, + RssFile, mapped files) and peak.
    status = {
        k: v.strip()
        for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    }
    return dict(
        rows=sum(s.rows for s in data.report.sources),
        samples=sum(s.train + s.eval for s in data.report.sources),
        imports_s=imports - started,
        tokenizer_s=loaded - imports,
        build_s=built - loaded,
        first_batch_s=first - built,
        to_first_batch_s=first - started,
        tokens_per_s=batches * 8 * 2048 / steady_s,
        **status,
    )


FIRST_STEP_RECIPE = """
import json, sys
sys.path.insert(0, {repo!r})
from configs.smollm2_sft_cpu import get_config as smollm2


def get_config():
    cfg = smollm2()
    cfg.data.update(json.loads({data!r}))
    cfg.data.batch_size = 4
    cfg.train.update(steps=1, eval_every=0, export=False, run_dir={run_dir!r})
    return cfg
"""


def first_step(data_cfg: dict, timeout: float = 900) -> dict:
    """`covenant-jax train` (SmolLM2-135M, 4 x 2048 tokens, CPU) on the data from its warm cache:
    seconds from the command's start to its progress bar (setup done: model loaded, data ready,
    state created) and to step 1 done (compiled and run). The run is then stopped."""
    import shutil  # pylint: disable=g-import-not-at-top

    run_dir = BENCH / "first_step_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = BENCH / "first_step_recipe.py"
    recipe.write_text(
        FIRST_STEP_RECIPE.format(repo=str(REPO), data=json.dumps(data_cfg), run_dir=str(run_dir))
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "covenant_jax.cli", "train", str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen, marks = b"", {}
    try:
        while "step" not in marks and time.perf_counter() - started < timeout:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break
            seen += chunk
            if "setup" not in marks and b"0/1 [" in seen:
                marks["setup"] = time.perf_counter() - started
            if b"1/1 [" in seen:
                marks["step"] = time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    if "step" not in marks:
        raise RuntimeError(f"train did not reach step 1:\n{seen.decode(errors='replace')[-3000:]}")
    return {"setup_s": marks.get("setup"), "first_step_s": marks["step"]}


def million(workers: int, batches: int) -> dict:
    files = million_rows(BENCH)
    out = {}
    for label, scale in (("1M", 1.0), ("100k", 0.1)):
        cfg = million_config(files, scale, workers)
        from covenant_jax.data import pipeline  # pylint: disable=g-import-not-at-top
        import transformers  # pylint: disable=g-import-not-at-top

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
        data, setup_s, cpu_s = timed_build(pipeline.build_pipeline, cfg, tokenizer)  # cold, or warm if done
        rows = sum(s.rows for s in data.report.sources)
        out[f"{label} prepare"] = dict(
            rows=rows, setup_s=setup_s, cpu_s=cpu_s, rows_per_cpu_s=rows / cpu_s, report=str(data.report)
        )
        print(f"  {label}: build {setup_s:.0f} s ({cpu_s:.0f} cpu s)\n{data.report}", flush=True)
        del data
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", json.dumps(cfg), "--batches", str(batches)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        out[f"{label} warm"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {label} warm start: {out[f'{label} warm']}", flush=True)
    out["1M train"] = first_step(
        {k: v for k, v in million_config(files, 1.0, workers).items() if k not in ("batch_size",)}
    )
    print(f"  1M covenant-jax train: {out['1M train']}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3000, help="ShareGPT rows (max_rows)")
    ap.add_argument("--batches", type=int, default=200, help="steady-state batches per case")
    ap.add_argument("--workers", type=int, default=0, help="data.workers (0: one per idle core)")
    ap.add_argument(
        "--only",
        choices=["sharegpt", "long_text", "none"],
        help="side by side on one material only (none: skip it)",
    )
    ap.add_argument("--million", action="store_true", help="also the 1M-row mixture")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # a warm start, in a fresh process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_warm(json.loads(args.measure), args.batches)))
        return 0
    missing = [p for p in (TOKENIZER, SHAREGPT, LONG_TEXT) if not p.exists()]
    if missing:
        print(f"missing material {[str(p) for p in missing]}: run tools/fetch_material.py")
        return 1
    import transformers  # pylint: disable=g-import-not-at-top

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    results = []
    for case in cases(args.rows):
        if not args.only or case["name"] == args.only:
            results += side_by_side(case, tokenizer, args.batches, args.workers)
    print(f"\ncpu cores: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}\n")
    if results:
        print(table(results))
    out = {"side_by_side": results}
    if args.million:
        out["million"] = million(args.workers, args.batches)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
