#!/usr/bin/env bash
# What a GPU session runs, in steps that fit the device tool's calls (10 minutes each,
# 30 minutes in all; build outputs stay between calls while the machine is warm).
#   bash scripts/gpu_session.sh [STEP ...]        from the repository root
# Steps, in the order worth running them (default: machine build cuda tests; then e.g.
# `bench:ops bench:limits bench:staging` and `sanitize bench:utils` in later calls):
#   machine   GPU, driver, link, torch / CUDA / nvcc / setuptools versions
#   build     SDICT_EXT_CUDA=1 make build for sm_90, the _C link (NEEDED), has_cuda()
#   cuda      the CUDA tests alone (pytest -m cuda), the fastest verdict
#   sanitize  compute-sanitizer memcheck over the CUDA op tests (caching allocator off)
#   tests     the whole suite
#   bench     python3 -m bench --device cuda --size $SIZE (default medium), all suites
#   bench:S   the same for suite S only (ops, utils, state_dict, staging, limits)
# Each step has a time limit (STEP_TIMEOUT, default 540 s), and all of them together
# DEADLINE (default 570 s, under the call's 600): a step that would start later is
# skipped, so the summary always comes back. Logs go to $OUT/<step>.log ($OUT
# defaults to bench_out/); the last lines printed are the per-step summary.
set -uo pipefail
OUT=${OUT:-bench_out}
SIZE=${SIZE:-medium}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(machine build cuda tests)
summary=()

run_step() {  # name, command...
  local name=$1
  shift
  local log="$OUT/${name//:/-}.log"
  local t0=$SECONDS
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    summary+=("$(printf '%-10s skipped: %ss left of DEADLINE' "$name" "$left")")
    return 0
  fi
  timeout --kill-after=5 "$((left < STEP_TIMEOUT ? left : STEP_TIMEOUT))" "$@" >"$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -1 "$log")")")
  return $rc
}

for step in "${steps[@]}"; do
  case $step in
    machine)
      run_step machine bash -c '
        date -u; nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
        python3 -c "import torch, setuptools; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"setuptools\", setuptools.__version__)"
        nvcc --version | tail -1; command -v compute-sanitizer'
      ;;
    build)
      run_step build bash -c '
        SDICT_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} make build || exit 1
        readelf -d sdict_ext/_C*.so | grep NEEDED
        python3 -c "import sdict_ext; assert sdict_ext.ops.has_cuda(), \"CUDA kernels were not built\"; print(\"has_cuda ok\")"'
      ;;
    cuda)
      run_step cuda python3 -m pytest -q -rs -m cuda tests
      ;;
    sanitize)
      # Without torch's caching allocator each tensor is its own allocation, so
      # memcheck sees an overrun past a tensor's end.
      run_step sanitize env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 9 python3 -m pytest -q -x -m cuda tests/test_ops.py
      ;;
    tests)
      run_step tests python3 -m pytest -q -rs tests
      ;;
    bench)
      run_step bench python3 -m bench --device cuda --size "$SIZE" --json "$OUT/$SIZE-cuda.json"
      ;;
    bench:*)
      suite=${step#bench:}
      run_step "$step" python3 -m bench --device cuda --size "$SIZE" --suite "$suite" \
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
printf '%s\n' "${summary[@]}"
