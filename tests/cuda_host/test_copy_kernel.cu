// Host emulation of the CUDA copy kernel (csrc/cuda/batched_copy_kernel.cu), for
// machines without a GPU: the table is built by the real copy_table_layout /
// fill_copy_table, then every chunk is executed thread by thread by the kernel's own
// copy_chunk (host+device code). Checked here: every destination byte equals the
// reference strided copy, no byte outside the destinations changes, every word access
// is aligned on both sides (what the GPU would fault on), int64 offsets past 4 GiB.
// Also the plan of pinned buckets for copies with pageable memory (plan_buckets).
// Built and run by `make cudahosttest` (also in .ci/run where nvcc exists) with
// ASan+UBSan, so an out-of-bounds index in the kernel's arithmetic fails here.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

static long g_misaligned = 0;
#ifdef __CUDA_ARCH__  // nvcc's device pass: the kernel itself, unchanged
#define SDICT_EXT_KERNEL_CHECK(cond)
#else
#define SDICT_EXT_KERNEL_CHECK(cond) \
  do {                               \
    if (!(cond)) ++g_misaligned;     \
  } while (0)
#endif

#include "../../csrc/cuda/batched_copy_kernel.cu"
// plan_buckets (copies with pageable memory through pinned buckets): host arithmetic.
#include "../../csrc/cuda/copy_engine_launch.cu"

namespace {

using sdict_ext::CopyTableLayout;
using sdict_ext::KernelCopy;

int g_failures = 0;

void fail(const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// A copy with owned storage on both sides: each side is its own heap block of exactly
// the bytes its layout reaches (plus the base misalignment), so ASan sees overruns.
struct Case {
  int64_t elem_size = 1;
  std::vector<int64_t> sizes, src_strides, dst_strides;
  int64_t src_pad = 0, dst_pad = 0;  // bytes before the first element
  bool zero = false;                  // a zero fill (src == nullptr): no source
  std::vector<unsigned char> src, dst;
  std::string name;

  static int64_t extent(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, int64_t elem) {
    int64_t last = 0;
    for (size_t k = 0; k < sizes.size(); ++k) {
      if (sizes[k] == 0) return 0;
      last += (sizes[k] - 1) * strides[k];
    }
    return last + elem;
  }
  void allocate(std::mt19937_64& rng) {
    src.resize(zero ? 0 : src_pad + extent(sizes, src_strides, elem_size));
    dst.resize(dst_pad + extent(sizes, dst_strides, elem_size));
    for (auto& b : src) b = static_cast<unsigned char>(rng());
    for (auto& b : dst) b = static_cast<unsigned char>(rng());
  }
  KernelCopy kernel_copy() {
    KernelCopy k;
    k.src = zero ? nullptr : reinterpret_cast<const char*>(src.data()) + src_pad;
    k.dst = reinterpret_cast<char*>(dst.data()) + dst_pad;
    k.elem_size = elem_size;
    k.ndim = static_cast<int64_t>(sizes.size());
    k.sizes = sizes.data();
    k.src_strides = src_strides.data();
    k.dst_strides = dst_strides.data();
    return k;
  }
  // What dst must hold after the copy: element by element, as at::Tensor::copy_.
  std::vector<unsigned char> expected() const {
    std::vector<unsigned char> out = dst;
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    std::vector<int64_t> idx(sizes.size(), 0);
    for (int64_t i = 0; i < numel; ++i) {
      int64_t so = src_pad, dof = dst_pad;
      for (size_t k = 0; k < sizes.size(); ++k) {
        so += idx[k] * src_strides[k];
        dof += idx[k] * dst_strides[k];
      }
      for (int64_t b = 0; b < elem_size; ++b) out[dof + b] = zero ? 0 : src[so + b];
      for (size_t k = sizes.size(); k-- > 0;) {
        if (++idx[k] < sizes[k]) break;
        idx[k] = 0;
      }
    }
    return out;
  }
};

// Runs a table of copies the way the kernel does, chunk by chunk (in a shuffled
// order: blocks run in any order) and thread by thread.
void emulate(const std::vector<KernelCopy>& copies, std::mt19937_64& rng) {
  const CopyTableLayout layout = sdict_ext::copy_table_layout(copies.data(), static_cast<int64_t>(copies.size()));
  std::vector<uint64_t> table((layout.bytes + 7) / 8 + 1);
  sdict_ext::fill_copy_table(copies.data(), layout, table.data());
  const char* base = reinterpret_cast<const char*>(table.data());
  const auto* descs = reinterpret_cast<const sdict_ext::CopyDesc*>(base + layout.descs_offset);
  const auto* owners = reinterpret_cast<const int32_t*>(base + layout.owners_offset);
  const auto* dims = reinterpret_cast<const int64_t*>(base + layout.dims_offset);
  for (int64_t c = 1; c < layout.chunks; ++c) {
    if (owners[c] < owners[c - 1]) fail("chunk owners are not in copy order");
  }
  std::vector<int64_t> order(static_cast<size_t>(layout.chunks));
  for (int64_t c = 0; c < layout.chunks; ++c) order[c] = c;
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t c : order) {
    for (int t = 0; t < sdict_ext::kCopyBlockThreads; ++t) {
      sdict_ext::copy_chunk(descs, owners, dims, c, t, sdict_ext::kCopyBlockThreads);
    }
  }
}

void run_cases(std::vector<Case>& cases, std::mt19937_64& rng, const std::string& label) {
  std::vector<KernelCopy> copies;
  std::vector<std::vector<unsigned char>> want;
  for (Case& c : cases) {
    c.allocate(rng);
    want.push_back(c.expected());
    copies.push_back(c.kernel_copy());
  }
  const long misaligned_before = g_misaligned;
  emulate(copies, rng);
  if (g_misaligned != misaligned_before) fail(label + ": a word access was misaligned");
  for (size_t i = 0; i < cases.size(); ++i) {
    if (cases[i].dst != want[i]) fail(label + ": wrong bytes in " + cases[i].name);
  }
}

Case dense(int64_t nbytes, int64_t src_pad, int64_t dst_pad) {
  Case c;
  c.sizes = {nbytes};
  c.src_strides = {1};
  c.dst_strides = {1};
  c.src_pad = src_pad;
  c.dst_pad = dst_pad;
  c.name = "dense " + std::to_string(nbytes) + "B +" + std::to_string(src_pad) + "/+" + std::to_string(dst_pad);
  return c;
}

// Contiguous strides of `sizes` in elements, scaled to bytes, with `pad` extra
// elements at the end of each row of the innermost dim when asked.
std::vector<int64_t> contiguous(const std::vector<int64_t>& sizes, int64_t elem, int64_t pad) {
  std::vector<int64_t> strides(sizes.size());
  int64_t step = elem;
  for (size_t k = sizes.size(); k-- > 0;) {
    strides[k] = step;
    step *= std::max<int64_t>(sizes[k], 1) + (k + 1 == sizes.size() ? pad : 0);
  }
  return strides;
}

// Dense runs of every length around the word and chunk sizes, at every relative
// alignment of the two sides: the head / body / tail split of copy_span.
void test_dense_runs(std::mt19937_64& rng) {
  const int64_t lengths[] = {0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 255, 256, 4095, 4097, 65535, 65536, 65537, 200003};
  for (int64_t n : lengths) {
    std::vector<Case> cases;
    for (int64_t sp = 0; sp < 16; sp += (n > 4096 ? 5 : 1)) {
      for (int64_t dp = 0; dp < 16; dp += (n > 4096 ? 3 : 1)) cases.push_back(dense(n, sp, dp));
    }
    run_cases(cases, rng, "dense runs of " + std::to_string(n) + " bytes");
  }
}

// Random strided layouts: permuted, padded, broadcast (stride 0) sources, every
// element size torch has (1..16 bytes), misaligned bases (storage offsets).
void test_random_strided(std::mt19937_64& rng) {
  const int64_t elems[] = {1, 2, 4, 8, 16};
  for (int round = 0; round < 60; ++round) {
    std::vector<Case> cases;
    const int count = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < count; ++i) {
      Case c;
      c.elem_size = elems[rng() % 5];
      const int ndim = static_cast<int>(rng() % 5);  // 0..4; 0 is a 0-dim tensor
      for (int k = 0; k < ndim; ++k) c.sizes.push_back(static_cast<int64_t>(rng() % (k + 1 == ndim ? 300 : 6)));
      if (rng() % 10 == 0 && ndim > 0) c.sizes[rng() % ndim] = 0;
      c.dst_strides = contiguous(c.sizes, c.elem_size, rng() % 3 == 0 ? static_cast<int64_t>(rng() % 5) : 0);
      c.src_strides = contiguous(c.sizes, c.elem_size, static_cast<int64_t>(rng() % 3));
      if (ndim >= 2 && rng() % 2) {
        const size_t a = rng() % ndim, b = rng() % ndim;  // a transposed source
        std::swap(c.src_strides[a], c.src_strides[b]);
      }
      if (ndim >= 1 && rng() % 6 == 0) c.src_strides[rng() % ndim] = 0;  // expanded source
      const bool byte_views = rng() % 4 == 0;  // any address, as uint8 views give
      c.src_pad = byte_views ? static_cast<int64_t>(rng() % 16) : c.elem_size * static_cast<int64_t>(rng() % 4);
      c.dst_pad = byte_views ? static_cast<int64_t>(rng() % 16) : c.elem_size * static_cast<int64_t>(rng() % 4);
      c.name = "case " + std::to_string(i) + " (elem " + std::to_string(c.elem_size) + ", ndim " +
               std::to_string(ndim) + ")";
      cases.push_back(std::move(c));
    }
    run_cases(cases, rng, "random strided round " + std::to_string(round));
  }
}

// Rows longer than a chunk (a unit cut across chunks) with padded strides, and rows
// just under it (several units per chunk), in one table with small copies.
void test_long_rows(std::mt19937_64& rng) {
  std::vector<Case> cases;
  for (int64_t row : {sdict_ext::kCopyChunkBytes + 1, 3 * sdict_ext::kCopyChunkBytes, int64_t{70001}}) {
    for (int64_t pad : {int64_t{0}, int64_t{16}, int64_t{3}}) {
      Case c;
      c.sizes = {3, row};
      c.src_strides = {row + pad, 1};
      c.dst_strides = {row + 2 * pad, 1};
      c.src_pad = pad;
      c.name = "rows of " + std::to_string(row) + " pad " + std::to_string(pad);
      cases.push_back(std::move(c));
    }
  }
  Case narrow;
  narrow.elem_size = 4;
  narrow.sizes = {1000, 16};
  narrow.src_strides = {64, 4};
  narrow.dst_strides = {80, 4};
  narrow.name = "1000 rows of 64 bytes";
  cases.push_back(std::move(narrow));
  cases.push_back(dense(5 * sdict_ext::kCopyChunkBytes + 9, 3, 7));
  run_cases(cases, rng, "long rows");
}

// Zero fills (pack's alignment gaps and tail): every length around the word and
// chunk sizes at every alignment, in one table with copies, as pack plans them.
void test_zero_fills(std::mt19937_64& rng) {
  const int64_t lengths[] = {1, 2, 3, 7, 15, 16, 17, 33, 4097, 65536, 65537, 200003};
  std::vector<Case> cases;
  for (int64_t n : lengths) {
    for (int64_t dp = 0; dp < 16; dp += (n > 4096 ? 5 : 1)) {
      Case z = dense(n, 0, dp);
      z.zero = true;
      z.name = "zero fill of " + std::to_string(n) + "B +" + std::to_string(dp);
      cases.push_back(std::move(z));
      cases.push_back(dense(1 + static_cast<int64_t>(rng() % 300), static_cast<int64_t>(rng() % 16), dp));
    }
  }
  run_cases(cases, rng, "zero fills among copies");
}

// The checkpoint case: thousands of small tensors in one launch.
void test_many_small(std::mt19937_64& rng) {
  std::vector<Case> cases;
  for (int i = 0; i < 5000; ++i) cases.push_back(dense(1 + static_cast<int64_t>(rng() % 4096), 0, 0));
  run_cases(cases, rng, "5000 small dense copies");
}

// Offsets past 2^32 bytes: a source whose outer stride is 5 GiB, in a reserved (not
// committed) mapping, so only the pages touched take memory.
void test_int64_offsets(std::mt19937_64& rng) {
  const int64_t outer = int64_t{5} << 30;
  const size_t reserve = static_cast<size_t>(3 * outer);
  void* map = mmap(nullptr, reserve, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) {
    std::fprintf(stderr, "skip int64 offsets: cannot reserve %zu bytes\n", reserve);
    return;
  }
  char* src = static_cast<char*>(map);
  const int64_t sizes[] = {3, 1000};
  const int64_t src_strides[] = {outer, 8};
  const int64_t dst_strides[] = {8000, 8};
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t j = 0; j < 8000; ++j) src[r * outer + j] = static_cast<char>(rng());
  }
  std::vector<char> dst(3 * 8000, 0);
  KernelCopy k;
  k.src = src;
  k.dst = dst.data();
  k.elem_size = 8;
  k.ndim = 2;
  k.sizes = sizes;
  k.src_strides = src_strides;
  k.dst_strides = dst_strides;
  emulate({k}, rng);
  for (int64_t r = 0; r < 3; ++r) {
    if (std::memcmp(dst.data() + r * 8000, src + r * outer, 8000) != 0) {
      fail("int64 offsets: row " + std::to_string(r) + " (source offset " + std::to_string(r * outer) + ")");
    }
  }
  munmap(map, reserve);
}

}  // namespace

// plan_buckets: every byte of every copy in exactly one piece, in order, each piece
// inside its bucket at a 16-byte aligned offset, buckets filled before the next starts.
void test_bucket_plan(std::mt19937_64& rng) {
  for (int round = 0; round < 200; ++round) {
    const int64_t capacity = 16 * static_cast<int64_t>(1 + rng() % 256);
    const bool to_host = rng() % 2 == 0;
    const size_t count = rng() % 40;
    std::vector<std::vector<char>> host(count), device(count);
    std::vector<sdict_ext::EngineCopy> copies(count);
    for (size_t i = 0; i < count; ++i) {
      const size_t bytes = rng() % 4 == 0 ? 0 : rng() % static_cast<size_t>(3 * capacity + 40);
      host[i].resize(bytes + 1);
      device[i].resize(bytes + 1);
      copies[i].bytes = bytes;
      copies[i].dst = to_host ? host[i].data() : device[i].data();
      copies[i].src = to_host ? device[i].data() : host[i].data();
    }
    const std::vector<sdict_ext::BucketPiece> pieces =
        sdict_ext::plan_buckets(copies.data(), count, to_host, capacity);
    size_t at = 0;
    int64_t bucket = 0, next_free = 0;
    const std::string where = "bucket plan round " + std::to_string(round);
    for (size_t i = 0; i < count; ++i) {
      for (int64_t done = 0; done < static_cast<int64_t>(copies[i].bytes);) {
        if (at == pieces.size()) {
          fail(where + ": copy " + std::to_string(i) + " not covered");
          return;
        }
        const sdict_ext::BucketPiece& p = pieces[at++];
        if (p.host != host[i].data() + done || p.device != device[i].data() + done || p.bytes <= 0) {
          fail(where + ": copy " + std::to_string(i) + " pieces out of order");
          return;
        }
        if (p.bucket == bucket + 1) {
          if (next_free < capacity) fail(where + ": a bucket started before the last was full");
          bucket = p.bucket;
          next_free = 0;
        }
        if (p.bucket != bucket || p.offset != next_free || p.offset % 16 != 0 || p.offset + p.bytes > capacity) {
          fail(where + ": piece " + std::to_string(at - 1) + " misplaced");
          return;
        }
        next_free = (p.offset + p.bytes + 15) / 16 * 16;
        done += p.bytes;
      }
    }
    if (at != pieces.size()) fail(where + ": pieces beyond the copies");
  }
}

int main() {
  std::mt19937_64 rng(20261123);
  test_bucket_plan(rng);
  test_dense_runs(rng);
  test_random_strided(rng);
  test_long_rows(rng);
  test_zero_fills(rng);
  test_many_small(rng);
  test_int64_offsets(rng);
  if (g_failures != 0) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("copy kernel host emulation: all checks passed\n");
  return 0;
}
