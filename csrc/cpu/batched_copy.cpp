#include <torch/library.h>

#include "sdict_ext/cpu.h"

namespace sdict_ext {

void batched_copy_cpu(at::TensorList dsts, at::TensorList srcs, bool /*non_blocking*/) {
  constexpr const char* op = "sdict_ext.batched_copy_";
  check_cpu(dsts, op, "destination");
  check_cpu(srcs, op, "source");
  execute_plan_cpu(plan_batched_copy(dsts, srcs));
}

TORCH_LIBRARY_IMPL(sdict_ext, CPU, m) {
  m.impl("batched_copy_", &batched_copy_cpu);
}

}  // namespace sdict_ext
