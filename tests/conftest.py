"""Every test sees 8 fake CPU devices, so sharded and single-device runs can be compared.

The test session (and every process it starts) shares one persistent compilation cache: many
tests and their subprocesses compile the same tiny train steps, and a cache hit skips XLA's
compile (the SIGKILL-and-resume test: 78 -> 34 s warm). It lives in a fresh folder per session,
so nothing carries over between runs.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="covenant-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
