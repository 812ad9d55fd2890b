// The copy plan: every sdict_ext op reduces to "copy these N (src, dst) byte
// layouts", whatever device executes it. Building the plan (validation, shape
// coalescing, overlap checks) is device-agnostic and lives here; the CPU and CUDA
// backends only execute it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include "sdict_ext/checked.h"

#include <cstdint>
#include <string>
#include <vector>

namespace sdict_ext {

// One copy of `numel` elements of `elem_size` bytes. Strides are in bytes and
// already coalesced: a dense copy has ndim <= 1 with both strides == elem_size.
// An entry with src == nullptr writes zeros instead (a dense run of bytes: pack's
// alignment gaps, see add_zero_fill); every backend executes both kinds.
struct CopyEntry {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t elem_size = 1;
  int64_t numel = 0;
  c10::SmallVector<int64_t, 6> sizes;
  c10::SmallVector<int64_t, 6> src_strides;
  c10::SmallVector<int64_t, 6> dst_strides;

  int64_t nbytes() const { return numel * elem_size; }
  bool dense() const {
    return sizes.size() <= 1 &&
        (sizes.empty() || (src_strides[0] == elem_size && dst_strides[0] == elem_size));
  }
};

// A strided view described by raw pointer, sizes and element strides. Lets the ops
// describe slices of a flat byte buffer without creating at::Tensor views.
struct Layout {
  char* ptr = nullptr;
  int64_t elem_size = 1;
  c10::SmallVector<int64_t, 6> sizes;
  c10::SmallVector<int64_t, 6> strides;  // in elements

  static Layout of(const at::Tensor& t);
  // A contiguous tensor as one run of numel elements: the cheapest layout to build
  // and to plan, for the common case of two contiguous tensors of equal shape.
  static Layout flat(const at::Tensor& t);
  // A dense row-major block of `sizes` starting at `ptr`.
  static Layout dense(char* ptr, int64_t elem_size, c10::IntArrayRef sizes);
  // The sub-box [starts, starts + sizes) of this layout.
  Layout box(c10::IntArrayRef starts, c10::IntArrayRef box_sizes) const;
  int64_t numel() const;
};

// Coalesces dims and appends the copy src -> dst (same sizes) to `plan`. Empty
// copies are dropped.
void add_copy(std::vector<CopyEntry>& plan, const Layout& dst, const Layout& src);

// Appends an entry that sets bytes [dst, dst + nbytes) to zero (nothing when empty).
void add_zero_fill(std::vector<CopyEntry>& plan, char* dst, int64_t nbytes);

// Whether copying `src` into `dst` rewrites every element with itself: same data
// pointer, sizes, strides and conjugate / negative bits (dtypes are checked apart). at::Tensor::copy_ returns
// at once for such a pair, and so does batched_copy_, which skips it.
bool same_elements(const at::Tensor& dst, const at::Tensor& src);

// How a planner refuses a call; either way it raises before anything is written.
// - kDeclined: a request that copying pair by pair (Tensor.copy_) would serve but one
//   call of this op does not: dtypes copy_ would cast, shapes it would broadcast,
//   pairs that overlap each other (tied weights named twice), tensors on devices one
//   call cannot reach together. Raised as c10::NotImplementedError (Python
//   NotImplementedError, a RuntimeError subclass), so a Python caller that can split
//   or reduce the call recognises it by its type and retries; nothing else is retried.
// - kInvalid: a request no route serves (a destination overlapping itself, an
//   inference tensor outside inference mode, a bad offset): c10::Error (RuntimeError).
enum class Refusal { kInvalid, kDeclined };

// A user tensor (or a slot of one) that an op reads or writes, for overlap checks.
struct Region {
  Layout layout;
  bool written = false;
  const char* name = "";  // "destination", "source", "out", ...
  int64_t index = -1;     // the user's index, -1 when the name says it all
};

// Raises (as `refusal` says) when a written region overlaps another written region or
// a read one. Exact for strided views whose address ranges interleave (e.g. the
// columns of one matrix). Reads may overlap reads.
void check_no_overlap(const std::vector<Region>& regions, const char* op, Refusal refusal = Refusal::kInvalid);

// A byte range [lo, hi) of a tensor an op touches, for the overlap sweeps. `tag` orders
// equal starts and names the tensor: a region index in check_no_overlap, a pair index
// in check_dense_overlap.
struct ByteSpan {
  uintptr_t lo;
  uintptr_t hi;  // exclusive
  int64_t tag;
};

// The copy of one pair of contiguous tensors: one run of bytes. A plan of these is a
// tenth the size of CopyEntry's (no sizes or strides), which counts when a state dict
// of 20,000 tensors is planned and then read back by the copying threads.
struct DenseCopy {
  const char* src;
  char* dst;
  int64_t nbytes;
};

// The byte ranges of the pairs of contiguous tensors a copy touches, one list per side.
struct DenseSpans {
  std::vector<ByteSpan> dst;
  std::vector<ByteSpan> src;
  void reserve(size_t n) {
    dst.reserve(n);
    src.reserve(n);
  }
};

// check_no_overlap for pairs of contiguous tensors (one byte range per side): sorts
// both lists and raises, naming the pairs, when a destination overlaps anything.
// Linear after the sort, and the sort is nearly linear when each side was allocated
// in order (the usual state dict). An overlap is declined (Refusal::kDeclined).
void check_dense_overlap(DenseSpans& spans, const char* op);

// The copy of a pair of contiguous, checked tensors (nbytes 0 for an empty pair).
DenseCopy dense_copy_of(const at::Tensor& dst, const at::Tensor& src);

// Appends `copy` to `copies` and its byte ranges to `spans` (nothing when empty).
// `index` is the user's pair index; `dst` and `src` are the pair `copy` was made of.
// A copy of a tensor onto itself (same_elements) is a no-op: only its destination
// range is recorded, so another pair writing or reading the same bytes is still an
// overlap.
void add_dense_copy(
    std::vector<DenseCopy>& copies,
    DenseSpans& spans,
    const DenseCopy& copy,
    int64_t index,
    const at::Tensor& dst,
    const at::Tensor& src);

// Per-pair argument checks for batched_copy_: strided, same dtype and shape (else
// declined: copy_ would convert, cast or broadcast), no self-overlapping destination
// (unless the pair is same_elements: a no-op, as in at::Tensor::copy_) and no
// inference-tensor destination outside inference mode (both invalid: copy_ refuses
// them too). `op` is used in messages.
void check_copy_pair(const at::Tensor& dst, const at::Tensor& src, int64_t i, const char* op);

// Raises when `t` (the op's `what` `index`; index -1: `what` alone names it) is an
// inference tensor and inference mode is off: at::Tensor::copy_ refuses that in-place
// update, and so does every op here. (Such a call skips the autograd kernel, which only
// sees tensors with autograd keys.)
void check_not_inference(const at::Tensor& t, const char* op, const char* what, int64_t index);

// Layout of the k-th of `world_size` chunks along `dim` of a tensor of size
// `dim_size`, with torch.chunk semantics: chunk length ceil(dim_size / world_size),
// trailing chunks possibly short or empty. Returns {start, length}.
std::pair<int64_t, int64_t> chunk_range(int64_t dim_size, int64_t world_size, int64_t k);

std::string sizes_str(c10::IntArrayRef s);

}  // namespace sdict_ext

namespace sdict_ext {

// Plans for each op, shared by the CPU and CUDA backends (csrc/plan/<family>.cpp).
// They validate every argument before returning, so a backend that executes a plan
// never writes anything when the input is bad; plan_batched_copy's refusals that a
// pair-by-pair copy would serve are declined (see Refusal).
std::vector<CopyEntry> plan_batched_copy(at::TensorList dsts, at::TensorList srcs);
// The same over borrowed tensors, for callers that hold no at::Tensor array.
std::vector<CopyEntry> plan_batched_copy(
    const std::vector<const at::Tensor*>& dsts, const std::vector<const at::Tensor*>& srcs);
// Every byte of `out` outside the slots is zeroed by the plan, so the packed bytes
// depend only on the tensors (a broadcast never ships stale memory).
std::vector<CopyEntry> plan_pack(at::TensorList tensors, c10::IntArrayRef offsets, const at::Tensor& out);
std::vector<CopyEntry> plan_unpack(
    const at::Tensor& flat,
    c10::IntArrayRef offsets,
    at::TensorList dsts,
    at::OptionalIntArrayRef full_sizes,
    at::OptionalIntArrayRef starts);
std::vector<CopyEntry> plan_gather_concat(
    const at::Tensor& gathered,
    int64_t chunk_numel,
    int64_t world_size,
    const at::Tensor& out,
    int64_t shard_dim);
std::vector<CopyEntry> plan_gather_concat_into(
    const at::Tensor& gathered,
    int64_t world_size,
    c10::IntArrayRef offsets,
    at::TensorList outs,
    c10::IntArrayRef shard_dims);

// Output tensor of gather_concat, allocated like `gathered` (dtype, device).
at::Tensor gather_concat_output(const at::Tensor& gathered, c10::IntArrayRef size);

}  // namespace sdict_ext
