// Every sdict_ext op schema, in one place. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake kernels live in sdict_ext/ops.py. The
// Python module that loads this library (and its bindings) is csrc/python/module.cpp.
#include <torch/library.h>

// Every op is cudagraph_unsafe: on CUDA it may wait on the stream and uploads a copy
// table from a recycled pinned block, so torch.compile's cudagraph trees must run it
// outside their graphs (the CUDA glue refuses a capture outright).
TORCH_LIBRARY(sdict_ext, m) {
  const std::vector<at::Tag> tags = {at::Tag::cudagraph_unsafe};
  m.def("batched_copy_(Tensor(a!)[] dsts, Tensor[] srcs, bool non_blocking=False) -> ()", tags);
  m.def("pack_into(Tensor[] tensors, int[] offsets, Tensor(a!) out) -> ()", tags);
  m.def(
      "unpack(Tensor flat, int[] offsets, Tensor(a!)[] dsts, int[]? full_sizes=None, "
      "int[]? starts=None) -> ()",
      tags);
  m.def(
      "gather_concat(Tensor gathered, int chunk_numel, int world_size, int[] size, "
      "int shard_dim) -> Tensor",
      tags);
  m.def(
      "gather_concat_into(Tensor gathered, int world_size, int[] offsets, Tensor(a!)[] outs, "
      "int[] shard_dims) -> ()",
      tags);
}
