#include <torch/library.h>

#include "sdict_ext/cpu.h"

namespace sdict_ext {

at::Tensor gather_concat_cpu(
    const at::Tensor& gathered,
    int64_t chunk_numel,
    int64_t world_size,
    c10::IntArrayRef size,
    int64_t shard_dim) {
  check_cpu({gathered}, "sdict_ext.gather_concat", "gathered");
  at::Tensor out = gather_concat_output(gathered, size);
  execute_plan_cpu(plan_gather_concat(gathered, chunk_numel, world_size, out, shard_dim));
  return out;
}

void gather_concat_into_cpu(
    const at::Tensor& gathered,
    int64_t world_size,
    c10::IntArrayRef offsets,
    at::TensorList outs,
    c10::IntArrayRef shard_dims) {
  constexpr const char* op = "sdict_ext.gather_concat_into";
  check_cpu({gathered}, op, "gathered");
  check_cpu(outs, op, "output");
  execute_plan_cpu(plan_gather_concat_into(gathered, world_size, offsets, outs, shard_dims));
}

TORCH_LIBRARY_IMPL(sdict_ext, CPU, m) {
  m.impl("gather_concat", &gather_concat_cpu);
  m.impl("gather_concat_into", &gather_concat_into_cpu);
}

}  // namespace sdict_ext
