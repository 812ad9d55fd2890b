#include <torch/library.h>

#include "execute.h"

namespace sdict_ext {

// The output is allocated on gathered's device, so this never waits on the stream.
at::Tensor gather_concat_cuda(
    const at::Tensor& gathered,
    int64_t chunk_numel,
    int64_t world_size,
    c10::IntArrayRef size,
    int64_t shard_dim) {
  CudaCall call("sdict_ext.gather_concat");
  call.add(gathered, "gathered");
  at::Tensor out = gather_concat_output(gathered, size);
  call.add(out, "out");
  call.run(plan_gather_concat(gathered, chunk_numel, world_size, out, shard_dim), /*non_blocking=*/false);
  return out;
}

// Outputs may live on the host (a gather with CPU offload): the call then returns
// once they are written, like at::Tensor::copy_ by default.
void gather_concat_into_cuda(
    const at::Tensor& gathered,
    int64_t world_size,
    c10::IntArrayRef offsets,
    at::TensorList outs,
    c10::IntArrayRef shard_dims) {
  CudaCall call("sdict_ext.gather_concat_into");
  call.add(gathered, "gathered");
  call.add(outs, "output");
  call.run(plan_gather_concat_into(gathered, world_size, offsets, outs, shard_dims), /*non_blocking=*/false);
}

TORCH_LIBRARY_IMPL(sdict_ext, CUDA, m) {
  m.impl("gather_concat", &gather_concat_cuda);
  m.impl("gather_concat_into", &gather_concat_into_cuda);
}

}  // namespace sdict_ext
