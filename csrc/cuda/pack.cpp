// pack / unpack have no non_blocking argument: a call that moves data between host
// and device returns once it is done, like at::Tensor::copy_ by default; a call on
// one device stays asynchronous on the current stream.
#include <torch/library.h>

#include "execute.h"

namespace sdict_ext {

void pack_into_cuda(at::TensorList tensors, c10::IntArrayRef offsets, const at::Tensor& out) {
  CudaCall call("sdict_ext.pack");
  call.add(tensors, "tensor");
  call.add(out, "out");
  call.run(plan_pack(tensors, offsets, out), /*non_blocking=*/false);
}

void unpack_cuda(
    const at::Tensor& flat,
    c10::IntArrayRef offsets,
    at::TensorList dsts,
    at::OptionalIntArrayRef full_sizes,
    at::OptionalIntArrayRef starts) {
  CudaCall call("sdict_ext.unpack");
  call.add(flat, "flat");
  call.add(dsts, "destination");
  call.run(plan_unpack(flat, offsets, dsts, full_sizes, starts), /*non_blocking=*/false);
}

TORCH_LIBRARY_IMPL(sdict_ext, CUDA, m) {
  m.impl("pack_into", &pack_into_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace sdict_ext
