#!/usr/bin/env bash
# What a GPU session runs. A session has 15 minutes of device time, the machine's
# start-up (1-2 minutes) included, and one command may run 10: so the first call does
# everything that gives a verdict and the first numbers in under 9 minutes on an H100,
# and leaves time to rerun one step.
#   bash scripts/gpu_session.sh [STEP ...]        from the repository root
# Default steps (the first call): machine build cuda bench:ops bench:staging, benches
# at SIZE=small. Later calls, if time is left: e.g. `sanitize`, `tests`,
# `SIZE=medium bash scripts/gpu_session.sh bench:ops` (each on a warm machine: the
# build stays while it is held).
#   machine   GPU, driver, PCIe link, torch / CUDA / nvcc versions, compute-sanitizer
#   build     SDICT_EXT_CUDA=1 make build for sm_90 on every core, the _C link, has_cuda()
#   cuda      the CUDA tests alone (pytest -m cuda), the fastest verdict
#   sanitize  compute-sanitizer memcheck over the CUDA op tests (caching allocator off)
#   tests     the whole suite
#   bench     python3 -m bench --device cuda --size $SIZE, all suites
#   bench:S   the same for suite S only (ops, utils, state_dict, staging, limits)
# Each step has its own limit (below), and all of them together DEADLINE (default 530 s):
# a step that would start with under 20 s left is skipped, so the summary always comes
# back. Logs and JSON go to $OUT (the device tool's folder there; bench_out/ elsewhere):
# at most 8 files, as the tool returns. The last lines printed are the summary: one line
# per step (status, seconds, its last log line), the failed tests, then one verdict line.
set -uo pipefail
OUT=${OUT:-bench_out}
SIZE=${SIZE:-small}
DEADLINE=${DEADLINE:-530}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(machine build cuda bench:ops bench:staging)
summary=()
failed=()
ran=0

# Seconds each step may take at most (the first call's budget on an H100: about 10 +
# 200 + 120 + 120 + 80 s).
limit_of() {
  case $1 in
    machine) echo 30 ;;
    build) echo 300 ;;
    cuda) echo 180 ;;
    sanitize | tests | bench) echo 540 ;;
    *) echo 200 ;;
  esac
}

# compute-sanitizer from PATH, else from the toolkit (CUDA_HOME, nvcc's own folder).
find_sanitizer() {
  local nvcc_home=""
  command -v nvcc >/dev/null 2>&1 && nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" \
    "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
    "$nvcc_home/bin/compute-sanitizer"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

run_step() {  # name, command...
  local name=$1
  shift
  local log="$OUT/${name//:/-}.log"
  local t0=$SECONDS
  local left=$((DEADLINE - SECONDS))
  local limit
  limit=$(limit_of "$name")
  if [ "$left" -lt 20 ]; then
    summary+=("$(printf '%-14s SKIPPED  %ss left of DEADLINE=%s' "$name" "$left" "$DEADLINE")")
    failed+=("$name (not run: out of time)")
    return 0
  fi
  timeout --kill-after=5 "$((left < limit ? left : limit))" "$@" >"$log" 2>&1
  local rc=$?
  ran=$((ran + 1))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=TIMEOUT
  elif [ "$rc" -ne 0 ]; then
    status=FAILED
  fi
  [ "$status" != ok ] && failed+=("$name ($status, rc=$rc)")
  summary+=("$(printf '%-14s %-8s %4ss  %s' "$name" "$status" "$((SECONDS - t0))" "$(tail -1 "$log" | cut -c1-110)")")
  return $rc
}

for step in "${steps[@]}"; do
  case $step in
    machine)
      run_step machine bash -c '
        date -u; nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
        python3 -c "import torch, setuptools; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"setuptools\", setuptools.__version__)"
        nvcc --version | tail -1
        echo "compute-sanitizer: $1"' _ "$(find_sanitizer || echo 'not found')"
      ;;
    build)
      run_step build bash -c '
        SDICT_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) make build || exit 1
        readelf -d sdict_ext/_C*.so | grep NEEDED
        python3 -c "import sdict_ext; assert sdict_ext.ops.has_cuda(), \"CUDA kernels were not built\"; print(\"has_cuda ok\")"'
      ;;
    cuda)
      run_step cuda python3 -m pytest -q -rfEs -m cuda tests
      ;;
    sanitize)
      if sanitizer=$(find_sanitizer); then
        # Without torch's caching allocator each tensor is its own allocation, so
        # memcheck sees an overrun past a tensor's end.
        run_step sanitize env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
          --error-exitcode 9 python3 -m pytest -q -x -m cuda tests/test_ops.py
      else
        summary+=("$(printf '%-14s SKIPPED  compute-sanitizer not on PATH nor under CUDA_HOME' sanitize)")
        failed+=("sanitize (no compute-sanitizer)")
      fi
      ;;
    tests)
      run_step tests python3 -m pytest -q -rfEs tests
      ;;
    bench)
      run_step bench python3 -m bench --device cuda --size "$SIZE" --no-plot --json "$OUT/$SIZE-cuda.json"
      ;;
    bench:*)
      suite=${step#bench:}
      run_step "$step" python3 -m bench --device cuda --size "$SIZE" --suite "$suite" --no-plot \
        --json "$OUT/$SIZE-cuda-$suite.json"
      ;;
    *)
      echo "unknown step: $step" >&2
      exit 2
      ;;
  esac
done

[ -f "$OUT/machine.log" ] && cat "$OUT/machine.log"
for f in "$OUT"/bench*.log; do [ -f "$f" ] && cat "$f"; done
echo "===== gpu_session summary (SIZE=$SIZE, ${SECONDS}s of DEADLINE=${DEADLINE}s) ====="
printf '%s\n' "${summary[@]}"
for log in "$OUT"/cuda.log "$OUT"/tests.log "$OUT"/sanitize.log; do
  [ -f "$log" ] && grep -E '^(FAILED|ERROR) ' "$log" | sed "s|^|  $(basename "$log" .log): |"
done
for log in "$OUT"/bench*.log; do
  [ -f "$log" ] && grep -E '^rows: ' "$log" | sed "s|^|  $(basename "$log" .log): |"
done
if [ ${#failed[@]} -eq 0 ]; then
  echo "verdict: all ${ran} steps passed"
else
  echo "verdict: ${#failed[@]} of ${#steps[@]} steps failed or did not run: $(IFS=';'; echo "${failed[*]}")"
fi
[ ${#failed[@]} -eq 0 ]
