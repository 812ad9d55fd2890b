// Thresholds of the CUDA copy routing that the benchmark must be able to move at run
// time, to measure both sides of each (python -m bench --device cuda, the sweep's
// "mapped kernel" and "copy engines" rows). No CUDA dependency: the setter is reached
// from Python (sdict_ext.ops.copy_thresholds) in every build.
#pragma once

#include <cstdint>

namespace sdict_ext {

struct CopyThresholds {
  // Device->pinned-host copies below this many bytes are written by the copy kernel
  // straight into mapped pinned memory: one launch for thousands of small tensors
  // instead of one copy-engine command each. Larger dense ones go to the copy
  // engines, which reach PCIe speed without occupying SMs.
  int64_t mapped_d2h_max_bytes = int64_t{1} << 20;
  // Pinned-host->device copies below this many bytes are read by the copy kernel from
  // mapped pinned memory. Kernel reads over PCIe are slower than the copy engines, so
  // this stays small: it only saves the per-command cost of tiny tensors.
  int64_t mapped_h2d_max_bytes = int64_t{64} << 10;
};
// Both defaults are first guesses until measured on a GPU (BENCHMARKS.md).

// The thresholds in force (one relaxed atomic load each).
CopyThresholds copy_thresholds();
// Sets them for the whole process; returns the previous ones.
CopyThresholds set_copy_thresholds(const CopyThresholds& value);

}  // namespace sdict_ext
