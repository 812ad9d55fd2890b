// Reading boxes of tensors straight out of another process's memory (Linux
// process_vm_readv, "cross-memory attach"): one copy per byte, by the reader alone.
// Only Linux has that call: elsewhere (macOS) everything here still compiles, the
// reads raise, and kDirectReadAvailable says so, so callers take another route.
#pragma once

#include <c10/util/ArrayRef.h>

#include <sys/types.h>

#include <cstdint>
#include <vector>

namespace sdict_ext {

// Whether this build reads other processes' memory (csrc/cpu/remote_read.cpp).
#if defined(__linux__)
constexpr bool kDirectReadAvailable = true;
#else
constexpr bool kDirectReadAvailable = false;
#endif

// One box of a C-contiguous tensor in another process, and where its bytes land here.
struct RemoteBox {
  std::uint64_t addr = 0;          // the remote tensor's first byte
  std::vector<int64_t> full;       // the remote tensor's sizes
  std::vector<int64_t> start;      // the box's first index in each dim
  std::vector<int64_t> size;       // the box's sizes (also the local tensor's)
  int64_t itemsize = 1;
  char* dst = nullptr;             // the box's bytes here, contiguous (prod(size) * itemsize)
};

// Raises unless `box` fits its tensor in every dim (and has an item size); returns whether
// it is empty.
inline bool check_box(const RemoteBox& box);

// Calls visit(byte offset in the remote tensor, byte count) for each contiguous run of
// `box`'s bytes, in the order of a contiguous tensor of the box's shape. Raises when the
// box leaves its tensor.
template <typename Visit>
void visit_box_runs(const RemoteBox& box, Visit&& visit);

// Reads every box from process `pid` into its `dst`, batching runs of many boxes into
// each system call (adjacent runs merged) and resuming after partial reads. Raises, naming
// the box and the errno's likely cause, when the kernel refuses. Returns the bytes read.
// Without kDirectReadAvailable, raises (NotImplementedError) before reading anything.
int64_t read_process_boxes(pid_t pid, const std::vector<RemoteBox>& boxes);

// Bytes sampled from each range by read_samples: two windows of up to 8 bytes, zero-padded.
constexpr int64_t kSampleBytes = 16;

// Reads, from process `pid`, two windows of each range [addrs[i], addrs[i] + nbytes[i]):
// its last (up to) 8 bytes, and 8 at a position drawn from (seed, ids[i]), into
// out[kSampleBytes * i ...]. Rank 0 samples its own tensors so; a rank about to read
// them reads the same windows at the addresses rank 0 announced, and reads directly only
// the ranges whose samples match (an address that is off, or not mapped, falls back to
// messages). Never raises for what the kernel refuses: returns, per range, whether its
// windows could be read (a range of no bytes, or that leaves the address space, cannot).
// Without kDirectReadAvailable, raises (NotImplementedError).
std::vector<bool> read_samples(pid_t pid, const std::vector<std::uint64_t>& addrs,
                               const std::vector<int64_t>& nbytes, const std::vector<std::uint64_t>& ids,
                               std::uint64_t seed, char* out);

}  // namespace sdict_ext

#include "sdict_ext/remote_read_inl.h"
