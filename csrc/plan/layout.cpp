// Layouts and copy entries: the vocabulary every planner (csrc/plan/*.cpp) builds its
// plan in, and the small checks they share (inference tensors, torch.chunk ranges).
#include "sdict_ext/copy_plan.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <sstream>

namespace sdict_ext {

std::string sizes_str(c10::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

Layout Layout::of(const at::Tensor& t) {
  Layout l;
  l.ptr = static_cast<char*>(t.numel() == 0 ? nullptr : t.data_ptr());
  l.elem_size = static_cast<int64_t>(t.element_size());
  l.sizes.assign(t.sizes().begin(), t.sizes().end());
  l.strides.assign(t.strides().begin(), t.strides().end());
  return l;
}

Layout Layout::flat(const at::Tensor& t) {
  Layout l;
  l.ptr = static_cast<char*>(t.numel() == 0 ? nullptr : t.data_ptr());
  l.elem_size = static_cast<int64_t>(t.element_size());
  l.sizes.push_back(t.numel());
  l.strides.push_back(1);
  return l;
}

Layout Layout::dense(char* ptr, int64_t elem_size, c10::IntArrayRef sizes) {
  Layout l;
  l.ptr = ptr;
  l.elem_size = elem_size;
  l.sizes.assign(sizes.begin(), sizes.end());
  l.strides.resize(sizes.size());
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    l.strides[d] = stride;
    // Callers bound the extent of every non-empty block, so only an empty one (a size
    // 0 elsewhere) can overflow here; its strides are never used.
    if (__builtin_mul_overflow(stride, std::max<int64_t>(sizes[d], 1), &stride)) stride = 0;
  }
  return l;
}

Layout Layout::box(c10::IntArrayRef starts, c10::IntArrayRef box_sizes) const {
  Layout l = *this;
  int64_t offset = 0;
  for (size_t d = 0; d < sizes.size(); ++d) {
    offset += starts[d] * strides[d];
    l.sizes[d] = box_sizes[d];
  }
  if (ptr != nullptr) {
    l.ptr = ptr + offset * elem_size;
  }
  return l;
}

int64_t Layout::numel() const {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

void add_copy(std::vector<CopyEntry>& plan, const Layout& dst, const Layout& src) {
  const int64_t numel = dst.numel();
  if (numel == 0) return;
  CopyEntry e;
  e.src = src.ptr;
  e.dst = dst.ptr;
  e.elem_size = dst.elem_size;
  e.numel = numel;
  // Walk from the innermost dim outwards, merging a dim into the previous run when
  // both sides keep it contiguous with that run; size-1 dims carry no stride.
  const int64_t esz = dst.elem_size;
  for (int64_t d = static_cast<int64_t>(dst.sizes.size()) - 1; d >= 0; --d) {
    const int64_t n = dst.sizes[d];
    if (n == 1) continue;
    const int64_t ss = src.strides[d] * esz;
    const int64_t ds = dst.strides[d] * esz;
    if (!e.sizes.empty()) {
      const int64_t run = e.sizes.back();
      if (ss == run * e.src_strides.back() && ds == run * e.dst_strides.back()) {
        e.sizes.back() *= n;
        continue;
      }
    }
    e.sizes.push_back(n);
    e.src_strides.push_back(ss);
    e.dst_strides.push_back(ds);
  }
  if (e.sizes.empty()) {
    e.sizes.push_back(1);
    e.src_strides.push_back(esz);
    e.dst_strides.push_back(esz);
  }
  std::reverse(e.sizes.begin(), e.sizes.end());
  std::reverse(e.src_strides.begin(), e.src_strides.end());
  std::reverse(e.dst_strides.begin(), e.dst_strides.end());
  plan.push_back(std::move(e));
}

void add_zero_fill(std::vector<CopyEntry>& plan, char* dst, int64_t nbytes) {
  if (nbytes <= 0) return;
  CopyEntry e;
  e.dst = dst;  // src stays nullptr: the executors write zeros
  e.elem_size = 1;
  e.numel = nbytes;
  e.sizes.push_back(nbytes);
  e.src_strides.push_back(1);
  e.dst_strides.push_back(1);
  plan.push_back(std::move(e));
}

bool same_elements(const at::Tensor& dst, const at::Tensor& src) {
  // const_data_ptr on both: asking leaves a copy-on-write tensor shared. A conjugate
  // or negative view of the same memory is not the same values (copy_ computes them).
  return dst.const_data_ptr() == src.const_data_ptr() && dst.sizes() == src.sizes() &&
      dst.strides() == src.strides() && dst.is_conj() == src.is_conj() && dst.is_neg() == src.is_neg();
}

void check_not_inference(const at::Tensor& t, const char* op, const char* what, int64_t index) {
  TORCH_CHECK(
      !t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", what,
      index >= 0 ? " " + std::to_string(index) : std::string(),
      " is an inference tensor, which may not be updated in place outside inference mode "
      "(Tensor.copy_ refuses it too); call this under torch.inference_mode(), or write into a "
      "clone of it made outside inference mode");
}

std::pair<int64_t, int64_t> chunk_range(int64_t dim_size, int64_t world_size, int64_t k) {
  // ceil(dim_size / world_size) and min(k * chunk, dim_size), neither able to wrap.
  const int64_t chunk = dim_size / world_size + (dim_size % world_size != 0 ? 1 : 0);
  const int64_t past = checked_mul(k, chunk);
  const int64_t start = past < 0 ? dim_size : std::min(past, dim_size);
  const int64_t len = std::max<int64_t>(0, std::min(chunk, dim_size - start));
  return {start, len};
}

}  // namespace sdict_ext
