// The raw copy-engine launcher: dense copies handed to the GPU's DMA copy engines
// (cudaMemcpyBatchAsync / cudaMemcpyAsync), the cutting of pageable copies into pinned
// buckets, and host-memory queries. CUDA runtime only (plain nvcc compiles it);
// csrc/cuda/execute.cpp decides which copies of a plan come here.
#include "sdict_ext/cuda_copy.h"

#include <vector>

namespace sdict_ext {

namespace {

cudaError_t copy_each(const EngineCopy* copies, size_t count, cudaStream_t stream) {
  for (size_t i = 0; i < count; ++i) {
    const cudaError_t err =
        cudaMemcpyAsync(copies[i].dst, copies[i].src, copies[i].bytes, cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#if CUDART_VERSION >= 12080
// One driver call for the whole list: with many small copies the cost of a call per
// copy, not the transfer, bounds the throughput; large copies gain nothing but lose
// nothing either.
cudaError_t copy_batch(const EngineCopy* copies, size_t count, cudaStream_t stream) {
  std::vector<void*> dsts(count);
  std::vector<void*> srcs(count);
  std::vector<size_t> sizes(count);
  for (size_t i = 0; i < count; ++i) {
    dsts[i] = copies[i].dst;
    srcs[i] = const_cast<void*>(copies[i].src);  // CUDA 12.8/12.9 take void**
    sizes[i] = copies[i].bytes;
  }
  cudaMemcpyAttributes attr{};
  // Sources may be written by earlier work on the stream (e.g. the step that just
  // produced the parameters), so they must be read in stream order.
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  // Staging is meant to overlap training compute: keep these copies off the SMs.
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attr_index = 0;
#if CUDART_VERSION >= 13000
  return cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attr, &attr_index, 1, stream);
#else
  size_t fail_index = 0;
  return cudaMemcpyBatchAsync(
      dsts.data(), srcs.data(), sizes.data(), count, &attr, &attr_index, 1, &fail_index, stream);
#endif
}
#endif

}  // namespace

cudaError_t copy_engine_async(const EngineCopy* copies, size_t count, bool batch, cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  // The batch API rejects the legacy default stream, which is torch's default.
  const bool legacy = stream == nullptr || stream == cudaStreamLegacy;
  if (batch && count > 1 && !legacy) {
    const cudaError_t err = copy_batch(copies, count, stream);
    // A runtime newer than the driver has the entry point but the driver cannot
    // serve it (cudaErrorCallRequiresNewerDriver): as good as unsupported.
    if (err != cudaErrorInvalidValue && err != cudaErrorNotSupported && err != cudaErrorCallRequiresNewerDriver) {
      return err;
    }
    // A driver that refuses the batch gets the same copies one by one; they are
    // independent, so re-issuing any that did start is harmless. Clear the error so
    // the caller's next launch check does not report it.
    (void)cudaGetLastError();
  }
#else
  (void)batch;
#endif
  return copy_each(copies, count, stream);
}

std::vector<BucketPiece> plan_buckets(const EngineCopy* copies, size_t count, bool to_host, int64_t capacity) {
  std::vector<BucketPiece> pieces;
  int64_t bucket = 0;
  int64_t used = 0;
  for (size_t i = 0; i < count; ++i) {
    const EngineCopy& c = copies[i];
    char* host = static_cast<char*>(to_host ? c.dst : const_cast<void*>(c.src));
    char* device = static_cast<char*>(to_host ? const_cast<void*>(c.src) : c.dst);
    const auto bytes = static_cast<int64_t>(c.bytes);
    for (int64_t done = 0; done < bytes;) {
      if (used >= capacity) {
        ++bucket;
        used = 0;
      }
      const int64_t n = bytes - done < capacity - used ? bytes - done : capacity - used;
      pieces.push_back(BucketPiece{host + done, device + done, n, bucket, used});
      used = align16(used + n);
      done += n;
    }
  }
  return pieces;
}

cudaError_t query_host_memory(const void* ptr, HostMemoryInfo* info) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) return err;
  // Pageable memory reports cudaMemoryTypeUnregistered (CUDA >= 11), not an error.
  info->pinned = attr.type == cudaMemoryTypeHost;
  info->device_ptr = info->pinned ? attr.devicePointer : nullptr;
  return cudaSuccess;
}

}  // namespace sdict_ext
