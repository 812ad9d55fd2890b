// The planners of pack_into and unpack: tensors to and from aligned slots of one flat
// uint8 buffer (a broadcast's bucket), boxes of the packed tensors included.
#include "sdict_ext/copy_plan.h"

#include "internal.h"

#include <ATen/MemoryOverlap.h>

namespace sdict_ext {

using plan_detail::check_flat;
using plan_detail::region;

std::vector<CopyEntry> plan_pack(at::TensorList tensors, c10::IntArrayRef offsets, const at::Tensor& out) {
  constexpr const char* op = "sdict_ext.pack";
  check_flat(out, op, "out");
  TORCH_CHECK(
      offsets.size() == tensors.size(), op, ": got ", tensors.size(), " tensors but ",
      offsets.size(), " offsets; compute them with sdict_ext.ops.pack_layout");
  const size_t n = tensors.size();
  char* base = static_cast<char*>(out.numel() == 0 ? nullptr : out.data_ptr());
  // Every byte of out is written (a slot's, or a zero between and after them), so a
  // source must not overlap any of out.
  std::vector<Region> regions;
  regions.reserve(n + 1);
  regions.push_back(region(out, true, "out", -1));
  check_not_inference(out, op, "out", -1);
  std::vector<int64_t> nbytes(n);
  std::vector<size_t> slots;  // tensors with bytes, in the order they lie in out
  slots.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(
        t.layout() == at::kStrided, op, ": tensor ", i, ": only strided tensors can be packed, found ",
        t.layout());
    nbytes[i] = checked_mul(t.numel(), static_cast<int64_t>(t.element_size()));
    TORCH_CHECK(
        range_fits(offsets[i], nbytes[i], out.numel()), op, ": tensor ", i, " (", nbytes[i],
        " bytes at offset ", offsets[i], ") does not fit in out of ", out.numel(),
        " bytes; compute the offsets with sdict_ext.ops.pack_layout and size out to fit");
    regions.push_back(region(t, false, "tensor", static_cast<int64_t>(i)));
    if (nbytes[i] > 0) slots.push_back(i);
  }
  const auto by_offset = [&](size_t a, size_t b) { return offsets[a] < offsets[b]; };
  if (!std::is_sorted(slots.begin(), slots.end(), by_offset)) {
    std::stable_sort(slots.begin(), slots.end(), by_offset);
  }
  for (size_t k = 1; k < slots.size(); ++k) {
    const size_t a = slots[k - 1];
    const size_t b = slots[k];
    TORCH_CHECK(
        offsets[b] >= offsets[a] + nbytes[a], op, ": the slot of tensor ", b, " (offset ", offsets[b],
        ") overlaps the slot of tensor ", a, " (", nbytes[a], " bytes at offset ", offsets[a],
        "); compute the offsets with sdict_ext.ops.pack_layout");
  }
  check_no_overlap(regions, op);
  // Slots in address order, each preceded by the gap before it: the gap's bytes are
  // written next to the slot's last ones, and only they are (under ALIGNMENT per slot
  // with pack_layout's offsets), not a memset of the whole buffer.
  std::vector<CopyEntry> plan;
  plan.reserve(2 * slots.size() + 1);
  int64_t cursor = 0;
  for (size_t i : slots) {
    add_zero_fill(plan, base + cursor, offsets[i] - cursor);
    add_copy(plan, Layout::dense(base + offsets[i], tensors[i].element_size(), tensors[i].sizes()),
             regions[i + 1].layout);
    cursor = offsets[i] + nbytes[i];
  }
  add_zero_fill(plan, base + cursor, out.numel() - cursor);
  return plan;
}

std::vector<CopyEntry> plan_unpack(
    const at::Tensor& flat,
    c10::IntArrayRef offsets,
    at::TensorList dsts,
    at::OptionalIntArrayRef full_sizes,
    at::OptionalIntArrayRef starts) {
  constexpr const char* op = "sdict_ext.unpack";
  check_flat(flat, op, "flat");
  TORCH_CHECK(
      offsets.size() == dsts.size(), op, ": got ", dsts.size(), " destinations but ",
      offsets.size(), " offsets");
  TORCH_CHECK(
      full_sizes.has_value() == starts.has_value(), op,
      ": full_sizes and starts go together; pass both or neither");
  int64_t total_dims = 0;
  for (const auto& d : dsts) total_dims += d.dim();
  if (full_sizes.has_value()) {
    TORCH_CHECK(
        static_cast<int64_t>(full_sizes->size()) == total_dims &&
            static_cast<int64_t>(starts->size()) == total_dims,
        op, ": full_sizes and starts must hold one entry per dim of every destination (", total_dims,
        " in all), found ", full_sizes->size(), " and ", starts->size());
  }
  char* base = static_cast<char*>(flat.numel() == 0 ? nullptr : flat.data_ptr());
  std::vector<Region> regions;
  regions.reserve(dsts.size() + 1);
  regions.push_back(region(flat, false, "flat", -1));
  std::vector<Layout> srcs;
  srcs.reserve(dsts.size());
  int64_t pos = 0;
  for (size_t i = 0; i < dsts.size(); ++i) {
    const at::Tensor& d = dsts[i];
    TORCH_CHECK(
        d.layout() == at::kStrided, op, ": destination ", i, ": only strided tensors, found ",
        d.layout());
    TORCH_CHECK(
        at::has_internal_overlap(d) != at::MemOverlap::Yes, op, ": destination ", i,
        " overlaps itself (an expanded view); pass a tensor with distinct elements");
    const int64_t nd = d.dim();
    c10::IntArrayRef full = full_sizes.has_value() ? full_sizes->slice(pos, nd) : d.sizes();
    c10::SmallVector<int64_t, 6> zero(nd, 0);
    c10::IntArrayRef start = starts.has_value() ? starts->slice(pos, nd) : c10::IntArrayRef(zero);
    pos += nd;
    for (int64_t k = 0; k < nd; ++k) {
      TORCH_CHECK(
          range_fits(start[k], d.size(k), full[k]), op, ": destination ", i, " of shape ",
          sizes_str(d.sizes()), " at start ", sizes_str(start), " does not fit in the packed shape ",
          sizes_str(full));
    }
    const int64_t nbytes = checked_extent(full, static_cast<int64_t>(d.element_size()));
    TORCH_CHECK(
        nbytes >= 0, op, ": destination ", i, ": the packed shape ", sizes_str(full),
        " holds more bytes than an int64 counts; pass the packed tensor's real shape");
    TORCH_CHECK(
        range_fits(offsets[i], nbytes, flat.numel()), op, ": destination ", i, " (", nbytes,
        " packed bytes at offset ", offsets[i], ") lies outside flat of ", flat.numel(),
        " bytes");
    check_not_inference(d, op, "destination", static_cast<int64_t>(i));
    if (d.numel() == 0) {
      srcs.emplace_back();  // nothing to copy (add_copy drops it): no box offset to compute
    } else {
      Layout whole = Layout::dense(base + offsets[i], d.element_size(), full);
      srcs.push_back(whole.box(start, d.sizes()));
    }
    regions.push_back(region(d, true, "destination", static_cast<int64_t>(i)));
  }
  check_no_overlap(regions, op);
  std::vector<CopyEntry> plan;
  plan.reserve(dsts.size());
  for (size_t i = 0; i < dsts.size(); ++i) {
    add_copy(plan, regions[i + 1].layout, srcs[i]);
  }
  return plan;
}

}  // namespace sdict_ext
