#include "sdict_ext/tuning.h"

#include <atomic>

namespace sdict_ext {

namespace {
std::atomic<int64_t> mapped_d2h_max{CopyThresholds{}.mapped_d2h_max_bytes};
std::atomic<int64_t> mapped_h2d_max{CopyThresholds{}.mapped_h2d_max_bytes};
}  // namespace

CopyThresholds copy_thresholds() {
  CopyThresholds t;
  t.mapped_d2h_max_bytes = mapped_d2h_max.load(std::memory_order_relaxed);
  t.mapped_h2d_max_bytes = mapped_h2d_max.load(std::memory_order_relaxed);
  return t;
}

CopyThresholds set_copy_thresholds(const CopyThresholds& value) {
  CopyThresholds old;
  old.mapped_d2h_max_bytes = mapped_d2h_max.exchange(value.mapped_d2h_max_bytes, std::memory_order_relaxed);
  old.mapped_h2d_max_bytes = mapped_h2d_max.exchange(value.mapped_h2d_max_bytes, std::memory_order_relaxed);
  return old;
}

}  // namespace sdict_ext
