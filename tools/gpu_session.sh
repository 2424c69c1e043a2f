#!/usr/bin/env bash
# The whole GPU check in one call on one H100/H200 host, run from the repository root:
#   bash tools/gpu_session.sh        (about 8 minutes; results in $OUT)
#
# Uses the host's python3, which must hold jax with CUDA, flax, optax, torch and transformers;
# covenant_jax comes from the working tree (PYTHONPATH), nothing is installed.
#   1. versions and the device;
#   2. tools/check_gpu_attention.py: cudnn vs blockwise, values and gradients (exit 1 on mismatch);
#   3. tools/bench_train.py: covenant_jax vs HF eager vs torch.compile, 4 x 2048 and 1 x 32768.
# Each step has its own time limit so a hang in one still returns the others' results.
# BENCH_ARGS: extra bench_train.py arguments (a CPU smoke run of this script:
#   PATH=.venv/bin:$PATH JAX_PLATFORMS=cpu BENCH_ARGS="--tiny --shapes 2x128 --steps 2" bash tools/gpu_session.sh)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys
import jax, flax, optax, torch, transformers
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)
print("devices", jax.devices(), "| torch cuda", torch.cuda.is_available())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"

timeout 150 python3 tools/check_gpu_attention.py 2>&1 | tee "$OUT/check_gpu_attention.txt"
echo "check_gpu_attention exit ${PIPESTATUS[0]}" | tee -a "$OUT/check_gpu_attention.txt"

timeout 420 python3 tools/bench_train.py --timeout 300 --json "$OUT/bench_train.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_train.txt"
echo "bench_train exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_train.txt"
