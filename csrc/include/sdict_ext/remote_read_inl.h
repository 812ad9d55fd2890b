// visit_box_runs (a template, so that callers' visitors inline).
#pragma once

#include <c10/util/Exception.h>

#include "sdict_ext/checked.h"

#include <cstddef>

namespace sdict_ext {

inline bool check_box(const RemoteBox& box) {
  const size_t dims = box.full.size();
  TORCH_CHECK(box.start.size() == dims && box.size.size() == dims,
              "sdict_ext.read_process_boxes: a box has ", box.start.size(), " starts and ", box.size.size(),
              " sizes for a ", dims, "-dim tensor");
  TORCH_CHECK(box.itemsize > 0, "sdict_ext.read_process_boxes: itemsize must be positive");
  bool empty = false;
  for (size_t d = 0; d < dims; ++d) {
    TORCH_CHECK(range_fits(box.start[d], box.size[d], box.full[d]),
                "sdict_ext.read_process_boxes: the box (start ", box.start[d], ", size ", box.size[d],
                ") leaves dim ", d, " of size ", box.full[d]);
    empty = empty || box.size[d] == 0;
  }
  // Every byte read lies in [addr, addr + the tensor's bytes): that range must be counted
  // in int64 and must not wrap the address space.
  const int64_t nbytes = checked_extent(box.full, box.itemsize);
  std::uint64_t end = 0;
  TORCH_CHECK(nbytes >= 0 && !__builtin_add_overflow(box.addr, static_cast<std::uint64_t>(nbytes), &end),
              "sdict_ext.read_process_boxes: a tensor of shape ", c10::IntArrayRef(box.full), " and item size ",
              box.itemsize, " at 0x", std::hex, box.addr, std::dec, " does not fit in the address space");
  return empty;
}

template <typename Visit>
void visit_box_runs(const RemoteBox& box, Visit&& visit) {
  if (check_box(box)) return;
  const size_t dims = box.full.size();
  // Dims after `cut` are whole: each run is the box's extent in `cut` times their volume.
  size_t cut = 0;
  for (size_t d = dims; d-- > 0;) {
    if (box.size[d] != box.full[d]) {
      cut = d;
      break;
    }
  }
  // Byte strides of the remote (contiguous) tensor.
  std::vector<int64_t> stride(dims + 1, box.itemsize);
  for (size_t d = dims; d-- > 0;) stride[d] = stride[d + 1] * box.full[d];
  if (dims == 0) {
    visit(int64_t{0}, box.itemsize);
    return;
  }
  const int64_t run = box.size[cut] * stride[cut + 1];
  int64_t base = 0;
  for (size_t d = 0; d <= cut; ++d) base += box.start[d] * stride[d + 1];
  // An odometer over the box's indices in dims before `cut`.
  std::vector<int64_t> index(cut, 0);
  while (true) {
    int64_t offset = base;
    for (size_t d = 0; d < cut; ++d) offset += index[d] * stride[d + 1];
    visit(offset, run);
    size_t d = cut;
    while (d > 0) {
      --d;
      if (++index[d] < box.size[d]) break;
      index[d] = 0;
      if (d == 0) return;
    }
    if (cut == 0) return;
  }
}

}  // namespace sdict_ext
