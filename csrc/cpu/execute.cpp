// The CPU executor of planned copies (csrc/plan/ builds the plans): the CPU side of
// what csrc/cuda/execute.cpp is for CUDA. Splits a plan's bytes evenly over torch's
// threads; dense runs are memcpy (or streaming stores), strided ones walk their dims.
#include "sdict_ext/cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define SDICT_EXT_STREAMING_STORES 1
#endif

namespace sdict_ext {

namespace {

// Below this many bytes a chunk is not worth a thread: the fork/join costs more.
constexpr int64_t kGrainBytes = int64_t{1} << 18;

// A plan this big cannot stay in cache, so its destination is written with
// non-temporal stores: they skip the read-for-ownership of every destination line, a
// read of memory that the copy overwrites anyway (glibc switches to such stores only
// for much larger single copies, so on mid-sized runs they are ours to issue).
constexpr int64_t kStreamingPlanBytes = int64_t{16} << 20;
// Below this, a run's unaligned head and tail would cost more than streaming saves.
constexpr int64_t kStreamingRunBytes = int64_t{4} << 10;
// From about here glibc's memcpy streams by itself, with a better tuned loop than ours,
// so longer runs go back to memcpy (the measurement is in BENCHMARKS.md).
constexpr int64_t kLibcStreamsBytes = int64_t{32} << 20;

// memcpy with non-temporal stores; the caller issues a fence before others read.
void stream_copy(char* dst, const char* src, size_t n) {
#ifdef SDICT_EXT_STREAMING_STORES
  size_t head = (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64;
  head = std::min(head, n);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const size_t body = n & ~size_t{63};
  for (size_t i = 0; i < body; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + body, src + body, n - body);
#else
  std::memcpy(dst, src, n);
#endif
}

inline void store_fence() {
#ifdef SDICT_EXT_STREAMING_STORES
  _mm_sfence();
#endif
}

template <int64_t N>
inline void copy_run_fixed(char* dst, const char* src, int64_t n, int64_t ds, int64_t ss) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + i * ds, src + i * ss, N);
  }
}

// Copies `n` elements along one dim; the element size is a compile-time constant
// on the common sizes so memcpy becomes a single load/store.
inline void copy_run(char* dst, const char* src, int64_t n, int64_t esz, int64_t ds, int64_t ss) {
  if (ds == esz && ss == esz) {
    std::memcpy(dst, src, static_cast<size_t>(n * esz));
    return;
  }
  switch (esz) {
    case 1: copy_run_fixed<1>(dst, src, n, ds, ss); return;
    case 2: copy_run_fixed<2>(dst, src, n, ds, ss); return;
    case 4: copy_run_fixed<4>(dst, src, n, ds, ss); return;
    case 8: copy_run_fixed<8>(dst, src, n, ds, ss); return;
    case 16: copy_run_fixed<16>(dst, src, n, ds, ss); return;
    default:
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(dst + i * ds, src + i * ss, static_cast<size_t>(esz));
      }
  }
}

// Copies elements [begin, end) (row-major order) of a strided entry.
void copy_strided(const CopyEntry& e, int64_t begin, int64_t end) {
  const int64_t nd = static_cast<int64_t>(e.sizes.size());
  c10::SmallVector<int64_t, 6> idx(nd, 0);
  int64_t rem = begin;
  int64_t soff = 0;
  int64_t doff = 0;
  for (int64_t d = nd - 1; d >= 0; --d) {
    idx[d] = rem % e.sizes[d];
    rem /= e.sizes[d];
    soff += idx[d] * e.src_strides[d];
    doff += idx[d] * e.dst_strides[d];
  }
  const int64_t inner = nd - 1;
  int64_t cur = begin;
  while (cur < end) {
    const int64_t run = std::min(e.sizes[inner] - idx[inner], end - cur);
    copy_run(e.dst + doff, e.src + soff, run, e.elem_size, e.dst_strides[inner], e.src_strides[inner]);
    cur += run;
    idx[inner] += run;
    soff += run * e.src_strides[inner];
    doff += run * e.dst_strides[inner];
    for (int64_t d = inner; d > 0 && idx[d] == e.sizes[d]; --d) {
      soff += e.src_strides[d - 1] - idx[d] * e.src_strides[d];
      doff += e.dst_strides[d - 1] - idx[d] * e.dst_strides[d];
      idx[d] = 0;
      ++idx[d - 1];
    }
  }
}

// Copies bytes [lo, hi) of a dense run.
inline void copy_dense(char* dst, const char* src, int64_t lo, int64_t hi, bool streaming) {
  const auto n = static_cast<size_t>(hi - lo);
  if (streaming && hi - lo >= kStreamingRunBytes && hi - lo < kLibcStreamsBytes) {
    stream_copy(dst + lo, src + lo, n);
  } else {
    std::memcpy(dst + lo, src + lo, n);
  }
}

// Copies bytes [lo, hi) of entry `e` (zero fills: writes zeros). Strided entries
// round both ends up to whole elements, so adjacent byte ranges split the elements
// without gaps or overlap.
void copy_bytes(const CopyEntry& e, int64_t lo, int64_t hi, bool streaming) {
  if (e.src == nullptr) {
    std::memset(e.dst + lo, 0, static_cast<size_t>(hi - lo));
    return;
  }
  if (e.dense()) {
    copy_dense(e.dst, e.src, lo, hi, streaming);
    return;
  }
  const int64_t first = (lo + e.elem_size - 1) / e.elem_size;
  const int64_t last = (hi + e.elem_size - 1) / e.elem_size;
  if (first < last) copy_strided(e, first, last);
}

void copy_bytes(const DenseCopy& c, int64_t lo, int64_t hi, bool streaming) {
  copy_dense(c.dst, c.src, lo, hi, streaming);
}

inline int64_t bytes_of(const CopyEntry& e) {
  return e.nbytes();
}

inline int64_t bytes_of(const DenseCopy& c) {
  return c.nbytes;
}

template <typename Entry>
void execute(const std::vector<Entry>& plan) {
  if (plan.empty()) return;
  std::vector<int64_t> starts(plan.size() + 1, 0);
  for (size_t i = 0; i < plan.size(); ++i) {
    starts[i + 1] = starts[i] + bytes_of(plan[i]);
  }
  const bool streaming = starts.back() >= kStreamingPlanBytes;
  at::parallel_for(0, starts.back(), kGrainBytes, [&](int64_t begin, int64_t end) {
    size_t i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    for (; i < plan.size() && starts[i] < end; ++i) {
      const int64_t lo = std::max(begin, starts[i]) - starts[i];
      const int64_t hi = std::min(end, starts[i + 1]) - starts[i];
      if (lo < hi) copy_bytes(plan[i], lo, hi, streaming);
    }
    // Non-temporal stores are weakly ordered: make them visible before the join.
    if (streaming) store_fence();
  });
}

}  // namespace

void execute_plan_cpu(const std::vector<CopyEntry>& plan) {
  execute(plan);
}

void execute_plan_cpu(const std::vector<DenseCopy>& plan) {
  execute(plan);
}

void check_cpu(at::TensorList tensors, const char* op, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    // Declined (Refusal::kDeclined): a call per device serves it.
    TORCH_CHECK_NOT_IMPLEMENTED(
        tensors[i].device().is_cpu(), op, ": ", what, " ", i, " is on ", tensors[i].device(),
        " but this is the CPU kernel; move it to the CPU, or build sdict_ext with CUDA for device copies");
  }
}

}  // namespace sdict_ext
