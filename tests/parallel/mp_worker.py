"""One process of a multi-process test job: runs CLI invocations in order, in one process.

argv: a JSON list of CLI argument lists, each starting with the distributed flags. Prints each
call's wall time and the process's CPU time so far (the logs say where a slow test spends it).
XLA_FLAGS (the fake device count) must be set by the parent: conftest's 8 devices do not apply.
"""

import json
import resource
import sys
import time

from covenant_jax import cli


def main() -> int:
    for args in json.loads(sys.argv[1]):
        started = time.time()
        rc = cli.main(args)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"[worker] {' '.join(args[-4:])}: rc {rc}, {time.time() - started:.1f}s wall, "
            f"process cpu so far {cpu.ru_utime + cpu.ru_stime:.1f}s",
            flush=True,
        )
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
