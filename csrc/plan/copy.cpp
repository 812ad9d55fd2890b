// The planner of batched_copy_: pairs of tensors of one dtype and shape, checked
// against each other (dtype, shape, overlap) before any byte is written. Contiguous
// pairs, the common state dict, are planned as byte runs without layouts.
#include "sdict_ext/copy_plan.h"

#include <ATen/MemoryOverlap.h>

namespace sdict_ext {

void check_copy_pair(const at::Tensor& dst, const at::Tensor& src, int64_t i, const char* op) {
  // Declined (NotImplementedError): what copy_ would do for the pair and this op does not.
  TORCH_CHECK_NOT_IMPLEMENTED(
      dst.layout() == at::kStrided && src.layout() == at::kStrided, op, ": pair ", i,
      ": only strided (dense) tensors are supported, found layouts ", dst.layout(), " and ",
      src.layout());
  TORCH_CHECK_NOT_IMPLEMENTED(
      dst.scalar_type() == src.scalar_type(), op, ": pair ", i, ": dtype mismatch, destination is ",
      dst.scalar_type(), " but source is ", src.scalar_type(),
      "; copies are byte-exact and never cast, convert the source first");
  TORCH_CHECK_NOT_IMPLEMENTED(
      dst.sizes() == src.sizes(), op, ": pair ", i, ": shape mismatch, destination is ",
      sizes_str(dst.sizes()), " but source is ", sizes_str(src.sizes()));
  // Invalid (RuntimeError): copy_ refuses these too. An expanded tensor copied onto
  // itself is a no-op, as for at::Tensor::copy_.
  TORCH_CHECK(
      dst.is_contiguous() || at::has_internal_overlap(dst) != at::MemOverlap::Yes ||
          same_elements(dst, src),
      op, ": destination ", i,
      " overlaps itself (an expanded view); pass a tensor with distinct elements");
  check_not_inference(dst, op, "destination", i);
}

std::vector<CopyEntry> plan_batched_copy(at::TensorList dsts, at::TensorList srcs) {
  std::vector<const at::Tensor*> d;
  std::vector<const at::Tensor*> s;
  d.reserve(dsts.size());
  s.reserve(srcs.size());
  for (const auto& t : dsts) d.push_back(&t);
  for (const auto& t : srcs) s.push_back(&t);
  return plan_batched_copy(d, s);
}

DenseCopy dense_copy_of(const at::Tensor& dst, const at::Tensor& src) {
  const auto nbytes = static_cast<int64_t>(dst.nbytes());
  if (nbytes == 0) return {nullptr, nullptr, 0};
  // The source is only read: const_data_ptr leaves a copy-on-write source shared.
  return {static_cast<const char*>(src.const_data_ptr()), static_cast<char*>(dst.mutable_data_ptr()), nbytes};
}

void add_dense_copy(
    std::vector<DenseCopy>& copies,
    DenseSpans& spans,
    const DenseCopy& copy,
    int64_t index,
    const at::Tensor& dst,
    const at::Tensor& src) {
  if (copy.nbytes == 0) return;
  const auto d = reinterpret_cast<uintptr_t>(copy.dst);
  const auto s = reinterpret_cast<uintptr_t>(copy.src);
  const auto len = static_cast<uintptr_t>(copy.nbytes);
  spans.dst.push_back({d, d + len, index});
  // The full test only for pairs starting at one byte, so the common pair pays nothing.
  if (d == s && same_elements(dst, src)) return;
  spans.src.push_back({s, s + len, index});
  copies.push_back(copy);
}

namespace {

// The common batched copy: every pair is two contiguous tensors (a state dict into its
// copy). Each side is then one byte range, so planning needs neither layouts nor
// element walks. Returns false, having written nothing, when some pair is not
// contiguous on both sides.
bool plan_dense_pairs(
    const std::vector<const at::Tensor*>& dsts,
    const std::vector<const at::Tensor*>& srcs,
    const char* op,
    std::vector<CopyEntry>& plan) {
  const size_t n = dsts.size();
  std::vector<DenseCopy> copies;
  DenseSpans spans;
  copies.reserve(n);
  spans.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& d = *dsts[i];
    const at::Tensor& s = *srcs[i];
    check_copy_pair(d, s, static_cast<int64_t>(i), op);
    if (!d.is_contiguous() || !s.is_contiguous()) return false;
    add_dense_copy(copies, spans, dense_copy_of(d, s), static_cast<int64_t>(i), d, s);
  }
  check_dense_overlap(spans, op);
  // The backends' executors take CopyEntry: each run as numel bytes.
  plan.reserve(copies.size());
  for (const DenseCopy& c : copies) {
    CopyEntry e;
    e.src = c.src;
    e.dst = c.dst;
    e.elem_size = 1;
    e.numel = c.nbytes;
    e.sizes.push_back(c.nbytes);
    e.src_strides.push_back(1);
    e.dst_strides.push_back(1);
    plan.push_back(std::move(e));
  }
  return true;
}

}  // namespace

std::vector<CopyEntry> plan_batched_copy(
    const std::vector<const at::Tensor*>& dsts, const std::vector<const at::Tensor*>& srcs) {
  constexpr const char* op = "sdict_ext.batched_copy_";
  TORCH_CHECK(
      dsts.size() == srcs.size(), op, ": got ", dsts.size(), " destinations and ", srcs.size(),
      " sources; pass one source per destination");
  {
    std::vector<CopyEntry> plan;
    if (plan_dense_pairs(dsts, srcs, op, plan)) return plan;
  }
  std::vector<Region> regions;
  regions.reserve(2 * dsts.size());
  std::vector<std::pair<size_t, size_t>> copies;  // (destination, source) in regions
  copies.reserve(dsts.size());
  for (size_t i = 0; i < dsts.size(); ++i) {
    const at::Tensor& d = *dsts[i];
    const at::Tensor& s = *srcs[i];
    const auto idx = static_cast<int64_t>(i);
    check_copy_pair(d, s, idx, op);
    const bool flat = d.is_contiguous() && s.is_contiguous();
    regions.push_back(Region{flat ? Layout::flat(d) : Layout::of(d), true, "destination", idx});
    // A tensor copied onto itself is skipped (a no-op, as in at::Tensor::copy_); its
    // destination still counts against the other pairs.
    if (same_elements(d, s)) continue;
    regions.push_back(Region{flat ? Layout::flat(s) : Layout::of(s), false, "source", idx});
    copies.emplace_back(regions.size() - 2, regions.size() - 1);
  }
  check_no_overlap(regions, op, Refusal::kDeclined);
  std::vector<CopyEntry> plan;
  plan.reserve(copies.size());
  for (const auto& [d, s] : copies) add_copy(plan, regions[d].layout, regions[s].layout);
  return plan;
}

}  // namespace sdict_ext
