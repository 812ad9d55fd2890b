// The planners of gather_concat and gather_concat_into: every rank's padded shard in an
// all-gathered buffer, copied into its place in the full tensor (torch.chunk layout).
#include "sdict_ext/copy_plan.h"

#include "internal.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>

namespace sdict_ext {

using plan_detail::check_flat;
using plan_detail::region;
using plan_detail::wrap_dim;

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
