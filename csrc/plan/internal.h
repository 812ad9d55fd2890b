// Argument checks that several planners share (csrc/plan/*.cpp only).
#pragma once

#include "sdict_ext/copy_plan.h"

namespace sdict_ext {
namespace plan_detail {

inline void check_flat(const at::Tensor& flat, const char* op, const char* name) {
  TORCH_CHECK(
      flat.scalar_type() == at::kByte && flat.dim() == 1 && flat.is_contiguous(), op, ": ", name,
      " must be a contiguous 1-D uint8 tensor, found ", flat.scalar_type(), " of shape ",
      sizes_str(flat.sizes()));
}

inline Region region(const at::Tensor& t, bool written, const char* name, int64_t index) {
  return Region{Layout::of(t), written, name, index};
}

inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op, int64_t index) {
  TORCH_CHECK(
      ndim > 0, op, ": tensor ", index, " is 0-dim and cannot be sharded; gather it as a plain tensor");
  TORCH_CHECK(
      dim >= -ndim && dim < ndim, op, ": tensor ", index, ": shard_dim ", dim,
      " is out of range for a ", ndim, "-dim tensor");
  return dim < 0 ? dim + ndim : dim;
}

}  // namespace plan_detail
}  // namespace sdict_ext
