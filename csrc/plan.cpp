// Building and validating copy plans. Everything here runs before any byte is
// written, so a bad argument leaves every destination untouched.
#include "sdict_ext/copy_plan.h"

#include <ATen/MemoryOverlap.h>
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

namespace {

ByteSpan span_of(const Region& r, size_t idx) {
  const Layout& l = r.layout;
  uintptr_t lo = reinterpret_cast<uintptr_t>(l.ptr);
  uintptr_t extent = static_cast<uintptr_t>(l.elem_size);
  for (size_t d = 0; d < l.sizes.size(); ++d) {
    extent += static_cast<uintptr_t>((l.sizes[d] - 1) * l.strides[d] * l.elem_size);
  }
  return {lo, lo + extent, static_cast<int64_t>(idx)};
}

const char* overlap_hint(bool other_written) {
  return other_written ? "; the result would depend on copy order. Pass disjoint destinations."
                       : "; a destination must not alias a source. Clone the source first.";
}

bool span_before(const ByteSpan& x, const ByteSpan& y) {
  return x.lo < y.lo || (x.lo == y.lo && x.tag < y.tag);
}

// Sorts `spans` by (lo, tag). Tensors allocated one after another mostly sit at rising
// addresses, so the list is usually a few ascending runs: those are merged (O(n log
// runs)) rather than sorted from scratch; a list in no particular order is sorted.
void sort_spans(std::vector<ByteSpan>& spans) {
  const size_t n = spans.size();
  std::vector<size_t> bounds{0};
  for (size_t i = 1; i < n; ++i) {
    if (span_before(spans[i], spans[i - 1])) bounds.push_back(i);
  }
  if (bounds.size() == 1) return;
  if (bounds.size() > n / 16) {
    std::sort(spans.begin(), spans.end(), span_before);
    return;
  }
  bounds.push_back(n);
  std::vector<ByteSpan> merged(n);
  while (bounds.size() > 2) {
    std::vector<size_t> next{0};
    for (size_t r = 0; r + 1 < bounds.size(); r += 2) {
      const auto lo = spans.begin() + static_cast<std::ptrdiff_t>(bounds[r]);
      const auto mid = spans.begin() + static_cast<std::ptrdiff_t>(bounds[r + 1]);
      const size_t end = r + 2 < bounds.size() ? bounds[r + 2] : bounds[r + 1];
      const auto hi = spans.begin() + static_cast<std::ptrdiff_t>(end);
      std::merge(lo, mid, mid, hi, merged.begin() + static_cast<std::ptrdiff_t>(bounds[r]), span_before);
      next.push_back(end);
    }
    spans.swap(merged);
    bounds.swap(next);
  }
}

// Sorts `spans` by (lo, tag) and calls conflict(a, b) for every pair whose byte ranges
// intersect, a sorted before b. Without overlaps the active set stays tiny, so this
// is O(n log n) for thousands of tensors.
template <typename Conflict>
void sweep_intersections(std::vector<ByteSpan>& spans, Conflict conflict) {
  sort_spans(spans);
  std::vector<ByteSpan> active;
  for (const ByteSpan& s : spans) {
    active.erase(
        std::remove_if(active.begin(), active.end(), [&](const ByteSpan& a) { return a.hi <= s.lo; }),
        active.end());
    for (const ByteSpan& a : active) conflict(a, s);
    active.push_back(s);
  }
}

bool is_dense(const Layout& l) {
  int64_t expected = 1;
  for (int64_t d = static_cast<int64_t>(l.sizes.size()) - 1; d >= 0; --d) {
    if (l.sizes[d] != 1 && l.strides[d] != expected) return false;
    expected *= l.sizes[d];
  }
  return true;
}

// Start addresses of every element, for the exact interleaving test.
std::vector<uintptr_t> element_addresses(const Layout& l) {
  std::vector<uintptr_t> out;
  out.reserve(static_cast<size_t>(l.numel()));
  const int64_t nd = static_cast<int64_t>(l.sizes.size());
  c10::SmallVector<int64_t, 6> idx(nd, 0);
  const int64_t n = l.numel();
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int64_t d = 0; d < nd; ++d) off += idx[d] * l.strides[d];
    out.push_back(reinterpret_cast<uintptr_t>(l.ptr) + off * l.elem_size);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < l.sizes[d]) break;
      idx[d] = 0;
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Whether two layouts whose address ranges intersect share a byte.
bool layouts_intersect(const Layout& a, const Layout& b) {
  if (is_dense(a) && is_dense(b)) return true;
  // Enumerating elements is exact; past this size we stay conservative.
  constexpr int64_t kExactLimit = int64_t{1} << 24;
  if (a.numel() + b.numel() > kExactLimit) return true;
  const std::vector<uintptr_t> as = element_addresses(a);
  const std::vector<uintptr_t> bs = element_addresses(b);
  for (uintptr_t bstart : bs) {
    const uintptr_t bend = bstart + static_cast<uintptr_t>(b.elem_size);
    // Every element of `a` has the same size, so only the last one starting
    // before bend can reach past bstart.
    auto it = std::lower_bound(as.begin(), as.end(), bend);
    if (it == as.begin()) continue;
    --it;
    if (*it + static_cast<uintptr_t>(a.elem_size) > bstart) return true;
  }
  return false;
}

std::string region_name(const Region& r) {
  std::ostringstream os;
  os << r.name;
  if (r.index >= 0) os << " " << r.index;
  return os.str();
}

}  // namespace

void check_no_overlap(const std::vector<Region>& regions, const char* op) {
  std::vector<ByteSpan> spans;
  spans.reserve(regions.size());
  bool any_written = false;
  for (size_t i = 0; i < regions.size(); ++i) {
    if (regions[i].layout.numel() == 0 || regions[i].layout.ptr == nullptr) continue;
    spans.push_back(span_of(regions[i], i));
    any_written = any_written || regions[i].written;
  }
  if (!any_written) return;
  sweep_intersections(spans, [&](const ByteSpan& a, const ByteSpan& s) {
    const Region& ra = regions[a.tag];
    const Region& rs = regions[s.tag];
    if (!ra.written && !rs.written) return;
    if (!layouts_intersect(ra.layout, rs.layout)) return;
    const Region& w = ra.written ? ra : rs;
    const Region& o = ra.written ? rs : ra;
    TORCH_CHECK(
        false, op, ": ", region_name(w), " overlaps ", region_name(o), " in memory",
        overlap_hint(o.written));
  });
}

void check_copy_pair(const at::Tensor& dst, const at::Tensor& src, int64_t i, const char* op) {
  TORCH_CHECK(
      dst.layout() == at::kStrided && src.layout() == at::kStrided, op, ": pair ", i,
      ": only strided (dense) tensors are supported, found layouts ", dst.layout(), " and ",
      src.layout());
  TORCH_CHECK(
      dst.scalar_type() == src.scalar_type(), op, ": pair ", i, ": dtype mismatch, destination is ",
      dst.scalar_type(), " but source is ", src.scalar_type(),
      "; copies are byte-exact and never cast, convert the source first");
  TORCH_CHECK(
      dst.sizes() == src.sizes(), op, ": pair ", i, ": shape mismatch, destination is ",
      sizes_str(dst.sizes()), " but source is ", sizes_str(src.sizes()));
  // An expanded tensor copied onto itself is a no-op, as for at::Tensor::copy_.
  TORCH_CHECK(
      dst.is_contiguous() || at::has_internal_overlap(dst) != at::MemOverlap::Yes ||
          same_elements(dst, src),
      op, ": destination ", i,
      " overlaps itself (an expanded view); pass a tensor with distinct elements");
  check_not_inference(dst, op, "destination", i);
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

namespace {

void check_flat(const at::Tensor& flat, const char* op, const char* name) {
  TORCH_CHECK(
      flat.scalar_type() == at::kByte && flat.dim() == 1 && flat.is_contiguous(), op, ": ", name,
      " must be a contiguous 1-D uint8 tensor, found ", flat.scalar_type(), " of shape ",
      sizes_str(flat.sizes()));
}

Region region(const at::Tensor& t, bool written, const char* name, int64_t index) {
  return Region{Layout::of(t), written, name, index};
}

int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op, int64_t index) {
  TORCH_CHECK(
      ndim > 0, op, ": tensor ", index, " is 0-dim and cannot be sharded; gather it as a plain tensor");
  TORCH_CHECK(
      dim >= -ndim && dim < ndim, op, ": tensor ", index, ": shard_dim ", dim,
      " is out of range for a ", ndim, "-dim tensor");
  return dim < 0 ? dim + ndim : dim;
}

}  // namespace

std::vector<CopyEntry> plan_batched_copy(at::TensorList dsts, at::TensorList srcs) {
  std::vector<const at::Tensor*> d;
  std::vector<const at::Tensor*> s;
  d.reserve(dsts.size());
  s.reserve(srcs.size());
  for (const auto& t : dsts) d.push_back(&t);
  for (const auto& t : srcs) s.push_back(&t);
  return plan_batched_copy(d, s);
}

void check_dense_overlap(DenseSpans& spans, const char* op) {
  // Byte ranges of contiguous tensors intersect exactly when the tensors overlap, and a
  // range overlaps one that starts no later exactly when it starts before the furthest
  // end seen so far. So one merged walk over the two sorted sides, remembering the
  // destination and the source that reach furthest, finds any overlap with a
  // destination (sources may overlap sources).
  sort_spans(spans.dst);
  sort_spans(spans.src);
  const std::vector<ByteSpan>& dsts = spans.dst;
  const std::vector<ByteSpan>& srcs = spans.src;
  const ByteSpan* far_dst = nullptr;
  const ByteSpan* far_src = nullptr;
  auto fail = [&](const ByteSpan& w, const ByteSpan& o, bool o_written) {
    TORCH_CHECK(
        false, op, ": destination ", w.tag, " overlaps ", o_written ? "destination " : "source ",
        o.tag, " in memory", overlap_hint(o_written));
  };
  size_t i = 0;
  size_t j = 0;
  while (i < dsts.size() || j < srcs.size()) {
    if (j == srcs.size() || (i < dsts.size() && dsts[i].lo <= srcs[j].lo)) {
      const ByteSpan& d = dsts[i++];
      if (far_dst != nullptr && d.lo < far_dst->hi) fail(*far_dst, d, true);
      if (far_src != nullptr && d.lo < far_src->hi) fail(d, *far_src, false);
      if (far_dst == nullptr || d.hi > far_dst->hi) far_dst = &d;
    } else {
      const ByteSpan& s = srcs[j++];
      if (far_dst != nullptr && s.lo < far_dst->hi) fail(*far_dst, s, false);
      if (far_src == nullptr || s.hi > far_src->hi) far_src = &s;
    }
  }
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
  check_no_overlap(regions, op);
  std::vector<CopyEntry> plan;
  plan.reserve(copies.size());
  for (const auto& [d, s] : copies) add_copy(plan, regions[d].layout, regions[s].layout);
  return plan;
}

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

namespace {

// Appends the copies of every rank's shard of one tensor. `rank_base(r)` is where
// rank r's shard starts; shards are stored dense.
template <typename RankBase>
void add_shard_copies(
    std::vector<CopyEntry>& plan,
    const Layout& out,
    int64_t dim,
    int64_t world_size,
    int64_t max_shard_bytes,
    const char* op,
    int64_t index,
    RankBase rank_base) {
  // Nothing to copy, and world_size may be anything that passed the size checks (a
  // gathered buffer of no bytes fits any): no walk over the ranks.
  if (out.numel() == 0) return;
  c10::SmallVector<int64_t, 6> starts(out.sizes.size(), 0);
  c10::SmallVector<int64_t, 6> shard(out.sizes.begin(), out.sizes.end());
  const int64_t full = chunk_range(out.sizes[dim], world_size, 0).second;
  int64_t merged = 0;  // leading ranks copied by one entry (see below)
  for (int64_t r = 0; r < world_size; ++r) {
    const int64_t len = chunk_range(out.sizes[dim], world_size, r).second;
    shard[dim] = len;
    int64_t bytes = out.elem_size;
    for (auto s : shard) bytes *= s;
    TORCH_CHECK(
        bytes <= max_shard_bytes, op, ": tensor ", index, ": the shard of rank ", r, " has ", bytes,
        " bytes but each rank's chunk holds only ", max_shard_bytes,
        "; chunk_numel / offsets do not match the full size");
    if (len == full && merged == r) ++merged;
  }
  // On an inner dim, every rank owns a few columns of every row. The full-width
  // leading ranks (equally spaced in the buffer) become ONE copy with a rank dim just
  // outside the shard dim, so the copy walks the output row by row, each row's pieces
  // from every rank in turn (torch.cat's order): the output is written sequentially
  // instead of one column block of all rows per rank.
  int64_t first = 0;
  char* const base0 = rank_base(0);
  const int64_t spacing = merged >= 2 && base0 != nullptr ? rank_base(1) - base0 : 0;
  if (dim > 0 && merged >= 2 && spacing > 0 && spacing % out.elem_size == 0) {
    bool even = true;
    for (int64_t r = 2; r < merged && even; ++r) even = rank_base(r) - base0 == r * spacing;
    if (even) {
      shard[dim] = full;
      Layout src = Layout::dense(base0, out.elem_size, shard);
      Layout dst = out;  // starts at 0 on every dim
      dst.sizes[dim] = full;
      src.sizes.insert(src.sizes.begin() + dim, merged);
      src.strides.insert(src.strides.begin() + dim, spacing / out.elem_size);
      dst.sizes.insert(dst.sizes.begin() + dim, merged);
      dst.strides.insert(dst.strides.begin() + dim, full * out.strides[dim]);
      add_copy(plan, dst, src);
      first = merged;
    }
  }
  for (int64_t r = first; r < world_size; ++r) {
    const auto [start, len] = chunk_range(out.sizes[dim], world_size, r);
    starts[dim] = start;
    shard[dim] = len;
    add_copy(plan, out.box(starts, shard), Layout::dense(rank_base(r), out.elem_size, shard));
  }
}

// Below this many bytes a tensor's shard copies stay as they are: one thread copies
// them anyway (the CPU executor's grain is 256 KiB).
constexpr int64_t kBandTensorBytes = int64_t{1} << 20;
// Bytes of output per band, and the most bands per tensor.
constexpr int64_t kBandBytes = int64_t{64} << 10;
constexpr int64_t kMaxBands = 1024;

// Re-cuts the shard copies plan[first..] of ONE tensor sharded on an inner dim, where
// every rank's copy covers all the tensor's rows with a few columns each: into bands of
// rows, ordered band by band (every rank's piece of band 0, then of band 1, ...). A
// stretch of the plan then fills one contiguous band of the output, so when the CPU
// executor splits the plan's bytes over threads each thread writes its own bands and
// pages, instead of every thread writing some columns of every row (sharing cache lines
// at the column boundaries and faulting in the same pages); a band also stays in cache
// while all ranks' pieces land in it, as with torch.cat. Left as is unless every copy
// has the same outer extent (a shard on dim 0 is one dense run: nothing to do).
void band_by_rows(std::vector<CopyEntry>& plan, size_t first) {
  const size_t count = plan.size() - first;
  if (count < 2) return;
  const int64_t rows = plan[first].sizes.size() >= 2 ? plan[first].sizes[0] : 0;
  if (rows < 2) return;
  int64_t total = 0;
  for (size_t i = first; i < plan.size(); ++i) {
    const CopyEntry& e = plan[i];
    if (e.sizes.size() < 2 || e.sizes[0] != rows) return;
    total += e.nbytes();
  }
  if (total < kBandTensorBytes) return;
  const int64_t row_bytes = total / rows;
  const int64_t band_bytes = std::max(kBandBytes, total / kMaxBands);
  const int64_t band_rows = std::max<int64_t>(1, band_bytes / std::max<int64_t>(row_bytes, 1));
  if (band_rows >= rows) return;
  std::vector<CopyEntry> whole(plan.begin() + static_cast<std::ptrdiff_t>(first), plan.end());
  plan.resize(first);
  plan.reserve(first + count * static_cast<size_t>((rows + band_rows - 1) / band_rows));
  for (int64_t a = 0; a < rows; a += band_rows) {
    const int64_t n = std::min(band_rows, rows - a);
    for (const CopyEntry& e : whole) {
      CopyEntry band = e;
      band.src = e.src + a * e.src_strides[0];
      band.dst = e.dst + a * e.dst_strides[0];
      band.sizes[0] = n;
      band.numel = e.numel / rows * n;
      plan.push_back(std::move(band));
    }
  }
}

}  // namespace

at::Tensor gather_concat_output(const at::Tensor& gathered, c10::IntArrayRef size) {
  return at::empty(size, gathered.options());
}

std::vector<CopyEntry> plan_gather_concat(
    const at::Tensor& gathered,
    int64_t chunk_numel,
    int64_t world_size,
    const at::Tensor& out,
    int64_t shard_dim) {
  constexpr const char* op = "sdict_ext.gather_concat";
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, found ", world_size);
  TORCH_CHECK(chunk_numel >= 0, op, ": chunk_numel must be >= 0, found ", chunk_numel);
  TORCH_CHECK(
      gathered.dim() == 1 && gathered.is_contiguous(), op,
      ": gathered must be the contiguous 1-D all-gather buffer, found shape ",
      sizes_str(gathered.sizes()));
  const int64_t needed = checked_mul(world_size, chunk_numel);
  const int64_t esz = gathered.element_size();
  TORCH_CHECK(
      needed >= 0 && checked_mul(needed, esz) >= 0 && gathered.numel() >= needed, op, ": gathered has ",
      gathered.numel(), " elements, fewer than world_size * chunk_numel = ", world_size, " * ",
      chunk_numel, "; chunk_numel is one rank's padded shard (gathered.numel() / world_size)");
  const int64_t dim = wrap_dim(shard_dim, out.dim(), op, 0);
  std::vector<CopyEntry> plan;
  // (One copy per rank holding a row of the shard dim at most: world_size may be huge.)
  plan.reserve(static_cast<size_t>(std::min<int64_t>(world_size, out.numel())));
  char* base = static_cast<char*>(gathered.numel() == 0 ? nullptr : gathered.data_ptr());
  add_shard_copies(
      plan, Layout::of(out), dim, world_size, chunk_numel * esz, op, 0,
      [&](int64_t r) { return base == nullptr ? nullptr : base + r * chunk_numel * esz; });
  band_by_rows(plan, 0);
  return plan;
}

std::vector<CopyEntry> plan_gather_concat_into(
    const at::Tensor& gathered,
    int64_t world_size,
    c10::IntArrayRef offsets,
    at::TensorList outs,
    c10::IntArrayRef shard_dims) {
  constexpr const char* op = "sdict_ext.gather_concat_into";
  check_flat(gathered, op, "gathered");
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, found ", world_size);
  TORCH_CHECK(
      gathered.numel() % world_size == 0, op, ": gathered has ", gathered.numel(),
      " bytes, not a multiple of world_size ", world_size);
  TORCH_CHECK(
      offsets.size() == outs.size() && shard_dims.size() == outs.size(), op, ": got ", outs.size(),
      " outputs, ", offsets.size(), " offsets and ", shard_dims.size(), " shard_dims");
  const int64_t stride = gathered.numel() / world_size;
  char* base = static_cast<char*>(gathered.numel() == 0 ? nullptr : gathered.data_ptr());
  std::vector<Region> regions;
  regions.reserve(outs.size() + 1);
  regions.push_back(region(gathered, false, "gathered", -1));
  for (size_t j = 0; j < outs.size(); ++j) {
    TORCH_CHECK(
        outs[j].layout() == at::kStrided, op, ": output ", j, ": only strided tensors, found ",
        outs[j].layout());
    TORCH_CHECK(
        offsets[j] >= 0 && offsets[j] <= stride, op, ": output ", j, ": offset ", offsets[j],
        " lies outside a rank's chunk of ", stride, " bytes");
    TORCH_CHECK(
        at::has_internal_overlap(outs[j]) != at::MemOverlap::Yes, op, ": output ", j,
        " overlaps itself (an expanded view)");
    check_not_inference(outs[j], op, "output", static_cast<int64_t>(j));
    regions.push_back(region(outs[j], true, "output", static_cast<int64_t>(j)));
  }
  check_no_overlap(regions, op);
  std::vector<CopyEntry> plan;
  plan.reserve(outs.size() * static_cast<size_t>(std::min<int64_t>(world_size, 64)));
  for (size_t j = 0; j < outs.size(); ++j) {
    const int64_t dim = wrap_dim(shard_dims[j], outs[j].dim(), op, static_cast<int64_t>(j));
    const int64_t off = offsets[j];
    const size_t first = plan.size();
    add_shard_copies(
        plan, regions[j + 1].layout, dim, world_size, stride - off, op, static_cast<int64_t>(j),
        [&](int64_t r) { return base == nullptr ? nullptr : base + r * stride + off; });
    band_by_rows(plan, first);
  }
  return plan;
}

}  // namespace sdict_ext
