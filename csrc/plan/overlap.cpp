// Overlap checks: whether a call's written tensors overlap each other or what it reads.
// Every planner runs one before returning its plan, so no backend ever executes a copy
// whose result would depend on copy order.
#include "sdict_ext/copy_plan.h"

#include <algorithm>
#include <sstream>
#include <string>

namespace sdict_ext {

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

void check_no_overlap(const std::vector<Region>& regions, const char* op, Refusal refusal) {
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
    const std::string why =
        c10::str(op, ": ", region_name(w), " overlaps ", region_name(o), " in memory", overlap_hint(o.written));
    TORCH_CHECK_NOT_IMPLEMENTED(refusal != Refusal::kDeclined, why);
    TORCH_CHECK(false, why);
  });
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
    TORCH_CHECK_NOT_IMPLEMENTED(
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

}  // namespace sdict_ext
