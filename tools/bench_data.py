#!/usr/bin/env python
"""Data pipeline speed on the real material: is the host pipeline faster than a training step?

    python tools/bench_data.py                      # the three cases below, ~1-2 min on 2 cores
    python tools/bench_data.py --rows 1000 --batches 20 --json bench_data.json

Cases (material/ as fetched by tools/fetch_material.py; tokenizer of smollm2-135m-instruct):
  sharegpt  seq 2048 and 8192, batch 8: material/sharegpt.jsonl, format sharegpt, the
            tokenizer's chat template, role_map chatgpt/bing/bard -> assistant, user -> user;
            the first --rows rows
  long_text seq 32768 and 8192, batch 8: material/long_text.jsonl, format text, overlength
            "split" (its longest documents are ~25k tokens: only the 8192 case splits some)

For each: setup = `build_pipeline` (read + validate + render + tokenise + split eval: all the
eager work, once per run), of which `read` is `sources.read_rows` alone; then one first batch
(the packer filling its bins) and steady state = the next --batches batches, in batches/s and
tokens/s. Setup also shows its CPU seconds (all threads; on a busy machine the wall time is
worse). Tokens/s counts every slot of the [batch, seq_len] arrays (what a step consumes);
`fill` is the share of slots holding a real token (the rest is packing padding).

The verdict compares steady-state tokens/s with what one accelerator's training step consumes
(MATERIAL.md, one H100, Llama-3.2-1B shapes: 46-57k tokens/s at 4 x 2048, 22-26k at 1 x 32768).
One host process feeds all of its host's accelerators, so the margin must cover their number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covenant_jax.data import pipeline, sources  # noqa: E402

MATERIAL = REPO / "material"
TOKENIZER = MATERIAL / "smollm2-135m-instruct"
ROLE_MAP = {"chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "user": "user"}
# Tokens/s of one H100 training step, Llama-3.2-1B shapes (MATERIAL.md), by seq_len: the
# fastest measured at 4 x 2048 (torch.compile), also used for 8192 (none measured; longer rows
# are slower per token, so this overstates what a step needs), and plain JAX at 1 x 32768.
STEP_TOKENS_PER_S = {2048: 56_805, 8192: 56_805, 32768: 26_084}


def cases(rows: int) -> list[dict]:
    sharegpt = dict(
        path=str(MATERIAL / "sharegpt.jsonl"), format="sharegpt", role_map=ROLE_MAP,
        max_rows=rows,
    )  # fmt: skip
    long_text = dict(path=str(MATERIAL / "long_text.jsonl"), format="text")
    return [
        dict(name="sharegpt", source=sharegpt, seq_len=2048, batch_size=8),
        dict(name="sharegpt", source=sharegpt, seq_len=8192, batch_size=8),
        dict(name="long_text", source=long_text, seq_len=32768, batch_size=8, overlength="split"),
        dict(name="long_text", source=long_text, seq_len=8192, batch_size=8, overlength="split"),
    ]


def run_case(case: dict, tokenizer, batches: int) -> dict:
    src = case["source"]
    t0 = time.perf_counter()
    n_read = len(sources.read_rows(src["path"], src.get("max_rows", 0)))
    read_s = time.perf_counter() - t0

    cfg = pipeline.default_config()
    cfg.update(
        sources=[src], template="tokenizer", seq_len=case["seq_len"],
        batch_size=case["batch_size"], overlength=case.get("overlength", "truncate"), epochs=0,
    )  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    data = pipeline.build_pipeline(cfg, tokenizer, process_index=0, process_count=1)
    setup_s, setup_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    it = iter(data.train)
    t0 = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - t0
    real = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    steady_s = time.perf_counter() - t0
    slots = batches * case["batch_size"] * case["seq_len"]
    rep = data.report.sources[0]
    step = STEP_TOKENS_PER_S[case["seq_len"]]
    return dict(
        case=case["name"], seq_len=case["seq_len"], batch=case["batch_size"],
        overlength=cfg.overlength, rows=rep.rows, read_rows=n_read, samples=rep.train,
        tokens=rep.tokens, skipped=sum(rep.skipped.values()), truncated=rep.truncated,
        split=rep.split, pieces=rep.pieces, read_s=read_s, setup_s=setup_s, setup_cpu_s=setup_cpu_s,
        rows_per_s=rep.rows / setup_s, setup_tokens_per_s=rep.tokens / setup_s,
        first_batch_s=first_s, batches_per_s=batches / steady_s, tokens_per_s=slots / steady_s,
        fill=real / slots, step_tokens_per_s=step, margin=slots / steady_s / step,
        report=str(rep),
    )  # fmt: skip


def table(results: list[dict]) -> str:
    head = (
        "| case | seq | rows | samples | tokens | read s | setup s (cpu s) | rows/s | setup tok/s "
        "| 1st batch s | batches/s | tokens/s | fill | H100 1B step tok/s | margin |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['case']} ({r['overlength']}) | {r['seq_len']} | {r['rows']} | {r['samples']} "
            f"| {r['tokens']:,} | {r['read_s']:.2f} | {r['setup_s']:.1f} ({r['setup_cpu_s']:.1f}) "
            f"| {r['rows_per_s']:.0f} "
            f"| {r['setup_tokens_per_s']:,.0f} | {r['first_batch_s']:.2f} "
            f"| {r['batches_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['fill']:.2f} "
            f"| {r['step_tokens_per_s']:,} | {r['margin']:.0f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3000, help="ShareGPT rows (max_rows)")
    ap.add_argument("--batches", type=int, default=30, help="steady-state batches per case")
    ap.add_argument("--only", choices=["sharegpt", "long_text"], help="run one material only")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    missing = [p for p in (TOKENIZER, MATERIAL / "sharegpt.jsonl", MATERIAL / "long_text.jsonl")
               if not p.exists()]  # fmt: skip
    if missing:
        print(f"missing material {[str(p) for p in missing]}: run tools/fetch_material.py")
        return 1
    import transformers  # pylint: disable=g-import-not-at-top

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    results = []
    for case in cases(args.rows):
        if args.only and case["name"] != args.only:
            continue
        r = run_case(case, tokenizer, args.batches)
        print(f"  {r['report']}\n  seq {r['seq_len']}: setup {r['setup_s']:.1f} s, "
              f"{r['tokens_per_s']:,.0f} tokens/s steady", flush=True)  # fmt: skip
        results.append(r)
    print(f"\ncpu cores: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}\n")
    print(table(results))
    slowest = min(r["margin"] for r in results)
    print(
        f"\nsteady state is {slowest:.0f}x (or more) what one H100 step on a 1B model consumes; "
        "one host process feeds all of its host's accelerators."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
