#!/usr/bin/env bash
# Run on a GPU host (the device machine): build the extension in place, run the GPU-marked
# tests, then the benchmarks. Logs go to $OUT (or ./gpu-out) for the record.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
python3 setup.py -q build_ext --inplace 2>&1 | tail -3
# Bytecode, as an installed package has it: without it every new process compiles what it
# imports (0.17 s of a new process's connect on the H200 host, measured).
python3 -m compileall -q -j 0 thaw thawd ${PYTHONPATH//:/ } >/dev/null 2>&1 || true
# The GPU host has no textual or vLLM: the suites that need them are not collected there.
python3 -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/thawctl --ignore=tests/engines \
  --ignore=tests/kv tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
for bench in "$@"; do
  echo "== $bench"
  python3 $bench 2>&1 | tee -a "$OUT/bench.log"
done
