#!/usr/bin/env bash
# Everything a GPU session needs in one device call (device time is short): build with
# CUDA, run the whole suite (CUDA tests included), then the GPU benchmark. Logs and the
# JSON go to $OUT (default bench_out/); the last lines printed are the summary.
#   run from the repository root:  bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} > "$OUT/machine.txt" 2>&1
SDICT_EXT_CUDA=1 make build > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import sdict_ext; assert sdict_ext.ops.has_cuda(), 'CUDA kernels were not built'"
python3 -m pytest -q -rs tests > "$OUT/tests.log" 2>&1
tests_rc=$?
python3 -m bench --device cuda --size medium --json "$OUT/medium-cuda.json" > "$OUT/bench.txt" 2>"$OUT/bench.err"
bench_rc=$?
cat "$OUT/machine.txt"
tail -5 "$OUT/tests.log"
cat "$OUT/bench.txt"
echo "tests rc=$tests_rc bench rc=$bench_rc"
