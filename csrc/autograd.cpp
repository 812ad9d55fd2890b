// Autograd kernels of the ops that write into their arguments: what PyTorch's own
// in-place ops do above the backend kernels, for every device.
//
// - A write into a tensor that requires grad while grad mode is on is refused, as
//   `copy_` refuses it for a leaf (these ops record no autograd history, so a tensor
//   inside a graph cannot take one either): under torch.no_grad() it is allowed.
// - Every written tensor's version counter is bumped after the write, so autograd
//   notices a tensor it saved for backward being overwritten, as with `copy_`.
//
// Inference tensors carry no autograd keys: calls on them only reach this kernel when
// mixed with normal tensors, and their (absent) version counters are left alone.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace sdict_ext {

namespace {

void check_writable(at::TensorList written, const char* op, const char* what) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t i = 0; i < written.size(); ++i) {
    TORCH_CHECK(!written[i].requires_grad(), op, ": ", what, " ", i,
                " requires grad, and this op records no autograd history; call it under "
                "torch.no_grad() (as loading a state dict does), or pass a tensor that "
                "does not require grad");
  }
}

void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

// What every kernel below does around its op: refuse a grad-requiring target, run
// the op below autograd (and the ADInplaceOrView key: straight to the backend
// kernel), then count the write.
template <typename Call>
void write_through(at::TensorList written, const char* op, const char* what, Call&& call) {
  check_writable(written, op, what);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call();
  }
  bump_versions(written);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void batched_copy_autograd(at::TensorList dsts, at::TensorList srcs, bool non_blocking) {
  static auto op = handle<void(at::TensorList, at::TensorList, bool)>("sdict_ext::batched_copy_");
  write_through(dsts, "sdict_ext.batched_copy_", "destination",
                [&] { op.call(dsts, srcs, non_blocking); });
}

void pack_into_autograd(at::TensorList tensors, c10::IntArrayRef offsets, const at::Tensor& out) {
  static auto op =
      handle<void(at::TensorList, c10::IntArrayRef, const at::Tensor&)>("sdict_ext::pack_into");
  write_through({out}, "sdict_ext.pack", "out", [&] { op.call(tensors, offsets, out); });
}

void unpack_autograd(const at::Tensor& flat, c10::IntArrayRef offsets, at::TensorList dsts,
                     at::OptionalIntArrayRef full_sizes, at::OptionalIntArrayRef starts) {
  static auto op = handle<void(const at::Tensor&, c10::IntArrayRef, at::TensorList,
                               at::OptionalIntArrayRef, at::OptionalIntArrayRef)>("sdict_ext::unpack");
  write_through(dsts, "sdict_ext.unpack", "destination",
                [&] { op.call(flat, offsets, dsts, full_sizes, starts); });
}

void gather_concat_into_autograd(const at::Tensor& gathered, int64_t world_size,
                                 c10::IntArrayRef offsets, at::TensorList outs,
                                 c10::IntArrayRef shard_dims) {
  static auto op = handle<void(const at::Tensor&, int64_t, c10::IntArrayRef, at::TensorList,
                               c10::IntArrayRef)>("sdict_ext::gather_concat_into");
  write_through(outs, "sdict_ext.gather_concat_into", "output",
                [&] { op.call(gathered, world_size, offsets, outs, shard_dims); });
}

}  // namespace

TORCH_LIBRARY_IMPL(sdict_ext, Autograd, m) {
  m.impl("batched_copy_", &batched_copy_autograd);
  m.impl("pack_into", &pack_into_autograd);
  m.impl("unpack", &unpack_autograd);
  m.impl("gather_concat_into", &gather_concat_into_autograd);
}

}  // namespace sdict_ext
