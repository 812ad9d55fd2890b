// The copy kernel: one launch executes a whole table of strided byte copies, any mix
// of sizes, in the multi-tensor-apply style. The table (a descriptor per copy, an
// owner per chunk) lives in device memory, so the number of copies per launch is
// unbounded and the kernel arguments stay tiny. CUDA runtime only: no torch headers.
#include "sdict_ext/cuda_copy.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

namespace sdict_ext {

namespace {

// A copy as the kernel sees it: `units` runs of `unit_bytes` contiguous bytes, laid
// out over `ndim` outer dims. A dense copy is one unit; a strided one whose innermost
// dim is contiguous on both sides has one unit per row, so rows still move as vectors.
struct CopyDesc {
  const char* src;
  char* dst;
  int64_t unit_bytes;
  int64_t units;
  // > 0: a chunk holds this many whole units. 0: one unit spans chunks_per_unit
  // chunks (units bigger than a chunk are cut so the whole grid shares them).
  int64_t units_per_chunk;
  int64_t chunks_per_unit;
  int64_t first_chunk;
  // Index in the dims array of this copy's outer sizes; its byte strides follow
  // (src, then dst), ndim values each.
  int64_t dims;
  int32_t ndim;
  // Bytes per load/store: both sides agree modulo `width` everywhere it is used.
  int16_t width;
  // Threads that copy one unit together (a power of two, at most a block).
  int16_t group;
};
static_assert(std::is_trivially_copyable<CopyDesc>::value, "the table is uploaded bytewise");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Dims the units are laid out over: all of them, or all but the innermost when that
// one is contiguous on both sides (it then forms the unit).
int64_t outer_dims(const KernelCopy& c) {
  if (c.ndim == 0) return 0;
  const int64_t last = c.ndim - 1;
  const bool inner_dense = c.src_strides[last] == c.elem_size && c.dst_strides[last] == c.elem_size;
  return inner_dense ? last : c.ndim;
}

int16_t widest_aligned(uint64_t misalignment) {
  int16_t w = 16;
  while (w > 1 && (misalignment & static_cast<uint64_t>(w - 1)) != 0) w >>= 1;
  return w;
}

struct Described {
  CopyDesc desc;
  int64_t chunks;
};

Described describe(const KernelCopy& c) {
  CopyDesc d{};
  d.src = c.src;
  d.dst = c.dst;
  const int64_t outer = outer_dims(c);
  d.ndim = static_cast<int32_t>(outer);
  d.unit_bytes = outer < c.ndim ? c.sizes[c.ndim - 1] * c.elem_size : c.elem_size;
  d.units = 1;
  for (int64_t k = 0; k < outer; ++k) d.units *= c.sizes[k];

  const auto src_addr = reinterpret_cast<uintptr_t>(c.src);
  const auto dst_addr = reinterpret_cast<uintptr_t>(c.dst);
  if (c.src == nullptr) {
    // A zero fill (one dense run): zero_span writes bytes up to an aligned address
    // itself, so it always stores full words.
    d.width = 16;
  } else if (d.units == 1) {
    // One run: only the two sides' relative alignment matters, the kernel copies
    // a byte head and tail around the aligned body.
    d.width = widest_aligned(src_addr - dst_addr);
  } else {
    // Many runs: make every run start aligned on both sides and a whole number of
    // words, so no run pays for a head or tail.
    uint64_t bits = src_addr | dst_addr | static_cast<uint64_t>(d.unit_bytes);
    for (int64_t k = 0; k < outer; ++k) {
      bits |= static_cast<uint64_t>(c.src_strides[k]) | static_cast<uint64_t>(c.dst_strides[k]);
    }
    d.width = widest_aligned(bits);
  }
  const int64_t words = ceil_div(d.unit_bytes, d.width);
  d.group = static_cast<int16_t>(std::min<int64_t>(kCopyBlockThreads, pow2_ceil(words)));

  int64_t chunks = 0;
  if (d.units == 0 || d.unit_bytes == 0) {
    d.units_per_chunk = 1;
    d.chunks_per_unit = 1;
  } else if (d.unit_bytes > kCopyChunkBytes) {
    d.units_per_chunk = 0;
    d.chunks_per_unit = ceil_div(d.unit_bytes, kCopyChunkBytes);
    d.group = kCopyBlockThreads;
    chunks = d.units * d.chunks_per_unit;
  } else {
    d.units_per_chunk = kCopyChunkBytes / d.unit_bytes;
    d.chunks_per_unit = 1;
    chunks = ceil_div(d.units, d.units_per_chunk);
  }
  return {d, chunks};
}

// The device code below is also host code (SDICT_EXT_HD): tests/cuda_host runs the
// kernel's work chunk by chunk and thread by thread on the CPU, so its indexing is
// checked (under ASan too) on machines without a GPU. Threads of a chunk never share
// bytes, so running them one after another is a faithful emulation.
#define SDICT_EXT_HD __host__ __device__ __forceinline__
// The host emulation defines this to check what the device would fault on (a word
// access at an address that is not a multiple of the word size).
#ifndef SDICT_EXT_KERNEL_CHECK
#define SDICT_EXT_KERNEL_CHECK(cond)
#endif

// std::min is not a device function without --expt-relaxed-constexpr.
SDICT_EXT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <int W>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned int; };
template <>
struct Word<2> { using type = unsigned short; };
template <>
struct Word<1> { using type = unsigned char; };

// Copies n bytes with `lanes` cooperating threads: bytes up to the first W-aligned
// source address, W-byte words (the caller guarantees dst is then W-aligned too),
// then the remaining bytes. Loads are batched ahead of stores so each thread keeps
// several requests in flight, which is what saturates HBM and PCIe.
template <int W>
SDICT_EXT_HD void copy_span(char* dst, const char* src, int64_t n, int lane, int lanes) {
  using T = typename Word<W>::type;
  constexpr int kUnroll = 4;
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(src) & (W - 1));
  const int64_t head = misalign == 0 ? 0 : min64(n, W - misalign);
  for (int64_t i = lane; i < head; i += lanes) dst[i] = src[i];
  const int64_t words = (n - head) / W;
  const T* s = reinterpret_cast<const T*>(src + head);
  T* d = reinterpret_cast<T*>(dst + head);
  SDICT_EXT_KERNEL_CHECK(
      words == 0 || ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d)) & (W - 1)) == 0);
  int64_t i = lane;
  for (; i + int64_t{kUnroll - 1} * lanes < words; i += int64_t{kUnroll} * lanes) {
    T r[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) r[k] = s[i + k * lanes];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) d[i + k * lanes] = r[k];
  }
  for (; i < words; i += lanes) d[i] = s[i];
  for (int64_t j = head + words * W + lane; j < n; j += lanes) dst[j] = src[j];
}

// Writes n zero bytes with `lanes` cooperating threads: bytes up to the first
// W-aligned address, W-byte words, then the remaining bytes (for a table entry
// with src == nullptr: a zero fill).
template <int W>
SDICT_EXT_HD void zero_span(char* dst, int64_t n, int lane, int lanes) {
  using T = typename Word<W>::type;
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & (W - 1));
  const int64_t head = misalign == 0 ? 0 : min64(n, W - misalign);
  for (int64_t i = lane; i < head; i += lanes) dst[i] = 0;
  const int64_t words = (n - head) / W;
  T* d = reinterpret_cast<T*>(dst + head);
  SDICT_EXT_KERNEL_CHECK(words == 0 || (reinterpret_cast<uintptr_t>(d) & (W - 1)) == 0);
  const T zero{};
  for (int64_t i = lane; i < words; i += lanes) d[i] = zero;
  for (int64_t j = head + words * W + lane; j < n; j += lanes) dst[j] = 0;
}

// Byte offsets of unit u on both sides; int64 throughout so tensors past 2^31
// elements index correctly.
SDICT_EXT_HD void unit_offsets(
    const CopyDesc& d, const int64_t* dims, int64_t u, int64_t& src_off, int64_t& dst_off) {
  src_off = 0;
  dst_off = 0;
  if (d.ndim == 0) return;
  const int64_t* sizes = dims + d.dims;
  const int64_t* ss = sizes + d.ndim;
  const int64_t* ds = ss + d.ndim;
  for (int k = d.ndim - 1; k > 0; --k) {
    const int64_t q = u / sizes[k];
    const int64_t idx = u - q * sizes[k];
    src_off += idx * ss[k];
    dst_off += idx * ds[k];
    u = q;
  }
  src_off += u * ss[0];
  dst_off += u * ds[0];
}

// Copies units [u, end) (every step-th) of `d`, bytes [lo, lo + n) of each, with
// `lanes` threads per unit. W is a template argument so each width's loop keeps its
// own registers.
template <int W>
SDICT_EXT_HD void copy_units(
    const CopyDesc& d, const int64_t* dims, int64_t u, int64_t end, int64_t step, int64_t lo, int64_t n,
    int lane, int lanes) {
  for (; u < end; u += step) {
    int64_t src_off = 0;
    int64_t dst_off = 0;
    unit_offsets(d, dims, u, src_off, dst_off);
    if (d.src == nullptr) {
      zero_span<W>(d.dst + dst_off + lo, n, lane, lanes);
    } else {
      copy_span<W>(d.dst + dst_off + lo, d.src + src_off + lo, n, lane, lanes);
    }
  }
}

// The work of thread `thread` (of `threads`, a multiple of every group size) on
// chunk `c` of the table: either groups of threads take whole units of the chunk, or
// all threads take one piece of a unit bigger than a chunk. owners[] names the copy
// of each chunk (one load, where a search over the copies would cost a chain of
// dependent ones).
SDICT_EXT_HD void copy_chunk(
    const CopyDesc* __restrict__ descs,
    const int32_t* __restrict__ owners,
    const int64_t* __restrict__ dims,
    int64_t c,
    int thread,
    int threads) {
  const int64_t e = owners[c];
  const CopyDesc d = descs[e];
  const int64_t local = c - d.first_chunk;
  int64_t u, end, step, lo, n;
  int lane, lanes;
  if (d.units_per_chunk > 0) {
    const int64_t first = local * d.units_per_chunk;
    lanes = d.group;
    lane = thread & (lanes - 1);
    u = first + thread / lanes;
    end = min64(first + d.units_per_chunk, d.units);
    step = threads / lanes;
    lo = 0;
    n = d.unit_bytes;
  } else {
    u = local / d.chunks_per_unit;
    end = u + 1;
    step = 1;
    lanes = threads;
    lane = thread;
    lo = (local - u * d.chunks_per_unit) * kCopyChunkBytes;
    n = min64(kCopyChunkBytes, d.unit_bytes - lo);
  }
  switch (d.width) {
    case 16: copy_units<16>(d, dims, u, end, step, lo, n, lane, lanes); break;
    case 8: copy_units<8>(d, dims, u, end, step, lo, n, lane, lanes); break;
    case 4: copy_units<4>(d, dims, u, end, step, lo, n, lane, lanes); break;
    case 2: copy_units<2>(d, dims, u, end, step, lo, n, lane, lanes); break;
    default: copy_units<1>(d, dims, u, end, step, lo, n, lane, lanes); break;
  }
}

// Each block walks chunks blockIdx.x, blockIdx.x + gridDim.x, ... of the whole
// table, so big and small copies interleave across the grid.
__global__ void __launch_bounds__(kCopyBlockThreads) batched_copy_kernel(
    const CopyDesc* __restrict__ descs,
    const int32_t* __restrict__ owners,
    const int64_t* __restrict__ dims,
    int64_t chunks) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    copy_chunk(descs, owners, dims, c, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  }
}

}  // namespace

CopyTableLayout copy_table_layout(const KernelCopy* copies, int64_t count) {
  CopyTableLayout layout;
  layout.count = count;
  for (int64_t i = 0; i < count; ++i) {
    const Described d = describe(copies[i]);
    layout.chunks += d.chunks;
    layout.dims_count += 3 * int64_t{d.desc.ndim};
  }
  layout.descs_offset = 0;
  layout.dims_offset = sizeof(CopyDesc) * static_cast<size_t>(count);
  layout.owners_offset = layout.dims_offset + sizeof(int64_t) * static_cast<size_t>(layout.dims_count);
  layout.bytes = layout.owners_offset + sizeof(int32_t) * static_cast<size_t>(layout.chunks);
  return layout;
}

void fill_copy_table(const KernelCopy* copies, const CopyTableLayout& layout, void* host_table) {
  char* base = static_cast<char*>(host_table);
  auto* dims = reinterpret_cast<int64_t*>(base + layout.dims_offset);
  auto* owners = reinterpret_cast<int32_t*>(base + layout.owners_offset);
  int64_t chunk = 0;
  int64_t dim_pos = 0;
  for (int64_t i = 0; i < layout.count; ++i) {
    const KernelCopy& c = copies[i];
    Described d = describe(c);
    d.desc.first_chunk = chunk;
    d.desc.dims = dim_pos;
    const int64_t nd = d.desc.ndim;
    for (int64_t k = 0; k < nd; ++k) {
      dims[dim_pos + k] = c.sizes[k];
      dims[dim_pos + nd + k] = c.src_strides[k];
      dims[dim_pos + 2 * nd + k] = c.dst_strides[k];
    }
    dim_pos += 3 * nd;
    char* desc_at = base + layout.descs_offset + sizeof(CopyDesc) * static_cast<size_t>(i);
    std::memcpy(desc_at, &d.desc, sizeof(CopyDesc));
    std::fill(owners + chunk, owners + chunk + d.chunks, static_cast<int32_t>(i));
    chunk += d.chunks;
  }
}

namespace {

// Blocks of the copy kernel one SM holds at once (register-bound); the same on every
// device of a process, so it is asked once.
cudaError_t resident_blocks_per_sm(int* blocks) {
  static std::atomic<int> cached{0};
  int value = cached.load(std::memory_order_relaxed);
  if (value == 0) {
    const cudaError_t err =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&value, batched_copy_kernel, kCopyBlockThreads, 0);
    if (err != cudaSuccess) return err;
    value = std::max(value, 1);
    cached.store(value, std::memory_order_relaxed);
  }
  *blocks = value;
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_batched_copy_kernel(
    const CopyTableLayout& layout, const void* device_table, cudaStream_t stream, int64_t max_blocks) {
  if (layout.chunks == 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = resident_blocks_per_sm(&per_sm);
  if (err != cudaSuccess) return err;
  // One wave of resident blocks: more blocks would only queue behind them, since
  // each block already walks every gridDim-th chunk.
  int64_t grid = std::min<int64_t>(layout.chunks, int64_t{sms} * per_sm);
  if (max_blocks > 0) grid = std::min(grid, max_blocks);
  const char* base = static_cast<const char*>(device_table);
  batched_copy_kernel<<<static_cast<unsigned int>(grid), kCopyBlockThreads, 0, stream>>>(
      reinterpret_cast<const CopyDesc*>(base + layout.descs_offset),
      reinterpret_cast<const int32_t*>(base + layout.owners_offset),
      reinterpret_cast<const int64_t*>(base + layout.dims_offset), layout.chunks);
  return cudaSuccess;
}

}  // namespace sdict_ext
