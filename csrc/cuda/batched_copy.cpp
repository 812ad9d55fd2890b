#include <torch/library.h>

#include "execute.h"

namespace sdict_ext {

void batched_copy_cuda(at::TensorList dsts, at::TensorList srcs, bool non_blocking) {
  CudaCall call("sdict_ext.batched_copy_");
  call.add(dsts, "destination");
  call.add(srcs, "source");
  call.run(plan_batched_copy(dsts, srcs), non_blocking);
}

TORCH_LIBRARY_IMPL(sdict_ext, CUDA, m) {
  m.impl("batched_copy_", &batched_copy_cuda);
}

}  // namespace sdict_ext
