// The CUDA copy backend's runtime-only interface. Everything here depends on the
// CUDA runtime alone (raw pointers, sizes, cudaStream_t), so csrc/cuda/*.cu compile
// with plain nvcc; the torch-facing glue (csrc/cuda/*.cpp) turns plans into these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace sdict_ext {

// Tuning knobs. Every value is a first guess, to be measured on the GPU machine
// (python -m bench) and recorded in BENCHMARKS.md. The mapped-memory thresholds are
// in sdict_ext/tuning.h: they can be moved at run time, so the benchmark measures both
// routes at every size.

// Bytes one thread block copies per unit of work; big tensors are cut into chunks
// of this size, small ones take one chunk each. A multiple of 16.
constexpr int64_t kCopyChunkBytes = int64_t{64} << 10;

// Threads per block of the copy kernel (a power of two).
constexpr int kCopyBlockThreads = 256;

// Most blocks of a launch whose every copy reads or writes mapped host memory. Such a
// launch is bound by PCIe bandwidth, which a few blocks with their loads in flight
// saturate; a full grid would only take SMs from the training beside it.
constexpr int64_t kCopyPcieMaxBlocks = 32;

// Pinned bucket size for copies with pageable host memory: two such buckets take
// turns, the CPU filling or emptying one while the copy engines move the other.
constexpr int64_t kPageableBucketBytes = int64_t{32} << 20;

// Most bytes of strided copies with mapped pinned memory that one call gathers into
// (or scatters from) a device temporary, so that PCIe sees one dense transfer: the
// temporary's bound. Past it, the kernel reads or writes the mapped memory directly.
constexpr int64_t kStridedStagingMaxBytes = int64_t{256} << 20;

// One copy for the copy kernel: `elem_size`-byte elements laid out by `sizes` with
// byte strides on either side (coalesced, innermost dim last, at least one dim).
// Both pointers must be dereferenceable on the current device (device memory, or
// the device alias of mapped pinned memory); src == nullptr writes zeros instead of
// copying. The arrays are read only while the table is built.
struct KernelCopy {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t elem_size = 1;
  int64_t ndim = 0;
  const int64_t* sizes = nullptr;
  const int64_t* src_strides = nullptr;
  const int64_t* dst_strides = nullptr;
};

// Where the parts of a copy table lie in its one buffer, so the table goes up with a
// single host->device copy whatever the number of copies.
struct CopyTableLayout {
  int64_t count = 0;         // copies
  int64_t chunks = 0;        // units of work for the grid
  int64_t dims_count = 0;    // int64 values in the dims array
  size_t descs_offset = 0;   // one descriptor per copy
  size_t dims_offset = 0;    // int64: outer sizes and byte strides of the strided copies
  size_t owners_offset = 0;  // int32[chunks]: the copy each chunk belongs to
  size_t bytes = 0;          // the whole buffer
};

// Sizes the table for `copies` (host arithmetic only). Copies are limited to 2^31
// per table, far above what one call plans.
CopyTableLayout copy_table_layout(const KernelCopy* copies, int64_t count);

// Writes the table into `host_table` (layout.bytes bytes, 8-byte aligned,
// typically pinned).
void fill_copy_table(const KernelCopy* copies, const CopyTableLayout& layout, void* host_table);

// Enqueues the copy kernel on `stream` over a table already in device memory, on at
// most `max_blocks` blocks (0: one full wave of resident blocks).
// Returns errors of the device queries; launch errors are left for
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK in the caller).
cudaError_t launch_batched_copy_kernel(
    const CopyTableLayout& layout, const void* device_table, cudaStream_t stream, int64_t max_blocks = 0);

// One dense copy for the copy engines.
struct EngineCopy {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

// Enqueues dense copies between any two of device / pinned host memory on `stream`.
// With `batch`, uses cudaMemcpyBatchAsync where the runtime has it (CUDA >= 12.8) and
// the stream allows it (not the legacy default stream); copies in one call must be
// independent, as the batch runs them in any order. Pass batch=false for pageable
// host memory: cudaMemcpyAsync then has its documented synchronous behaviour (D2H
// returns once the data landed; H2D once the source was staged).
cudaError_t copy_engine_async(const EngineCopy* copies, size_t count, bool batch, cudaStream_t stream);

// `n` rounded up to 16: where the next copy starts in a pinned bucket or a device
// temporary, so that every copy there begins on a 16-byte boundary.
constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// One piece of a copy with pageable host memory staged through a pinned bucket: the
// bytes [host, host + bytes) and [device, device + bytes) go through bytes
// [offset, offset + bytes) of bucket `bucket`.
struct BucketPiece {
  char* host = nullptr;
  char* device = nullptr;
  int64_t bytes = 0;
  int64_t bucket = 0;
  int64_t offset = 0;
};

// Cuts `copies` (host side dst when `to_host`, else src) into pieces that fill buckets
// of `capacity` bytes (> 0) in order: each piece starts 16-byte aligned in its bucket,
// a copy bigger than the room left is cut, and a bucket is full before the next starts.
// Host arithmetic only (tests/cuda_host checks it without a GPU).
std::vector<BucketPiece> plan_buckets(const EngineCopy* copies, size_t count, bool to_host, int64_t capacity);

// What the runtime knows of a host address: whether it is page-locked, and the
// address a kernel on the current device uses for it (nullptr when not mapped).
struct HostMemoryInfo {
  bool pinned = false;
  void* device_ptr = nullptr;
};
cudaError_t query_host_memory(const void* ptr, HostMemoryInfo* info);

}  // namespace sdict_ext
