// CPU execution of copy plans.
#pragma once

#include "sdict_ext/copy_plan.h"

namespace sdict_ext {

// Executes every entry of `plan`, splitting the total bytes into even chunks over
// at::parallel_for threads: a big tensor is cut, small ones are grouped. Dense
// entries are plain memcpy; strided ones walk their coalesced dims.
void execute_plan_cpu(const std::vector<CopyEntry>& plan);
// The same for a plan of contiguous runs (add_dense_pair).
void execute_plan_cpu(const std::vector<DenseCopy>& plan);

// Raises unless every tensor is on the CPU (declined, see Refusal in copy_plan.h: one call
// per device serves it); `op` and `what` name them in messages.
void check_cpu(at::TensorList tensors, const char* op, const char* what);

}  // namespace sdict_ext
