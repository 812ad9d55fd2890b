#include <torch/library.h>

#include "sdict_ext/cpu.h"

namespace sdict_ext {

void pack_into_cpu(at::TensorList tensors, c10::IntArrayRef offsets, const at::Tensor& out) {
  constexpr const char* op = "sdict_ext.pack";
  check_cpu(tensors, op, "tensor");
  check_cpu({out}, op, "out");
  execute_plan_cpu(plan_pack(tensors, offsets, out));
}

void unpack_cpu(
    const at::Tensor& flat,
    c10::IntArrayRef offsets,
    at::TensorList dsts,
    at::OptionalIntArrayRef full_sizes,
    at::OptionalIntArrayRef starts) {
  constexpr const char* op = "sdict_ext.unpack";
  check_cpu({flat}, op, "flat");
  check_cpu(dsts, op, "destination");
  execute_plan_cpu(plan_unpack(flat, offsets, dsts, full_sizes, starts));
}

TORCH_LIBRARY_IMPL(sdict_ext, CPU, m) {
  m.impl("pack_into", &pack_into_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace sdict_ext
