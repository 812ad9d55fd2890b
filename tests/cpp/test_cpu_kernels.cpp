// ctest: the CPU kernels against plain ATen, through the dispatcher (the same path
// Python takes) and through the planner directly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <string>
#include <vector>

#include "sdict_ext/copy_plan.h"
#include "sdict_ext/cpu.h"
#include "sdict_ext/remote_read.h"

#include <unistd.h>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

template <typename Fn>
void expect_throws(Fn fn, const std::string& needle, const char* what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what);
    return;
  }
  expect(false, what);
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
      at::equal(a.contiguous().view(-1).view(at::kByte), b.contiguous().view(-1).view(at::kByte));
}

void batched_copy(std::vector<at::Tensor> dsts, std::vector<at::Tensor> srcs) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdict_ext::batched_copy_", "")
                       .typed<void(at::TensorList, at::TensorList, bool)>();
  op.call(dsts, srcs, false);
}

void test_strided_and_dense_copies() {
  auto base = at::randn({9, 7, 5});
  std::vector<at::Tensor> srcs = {
      base, base.transpose(0, 2), base.slice(1, 1, 7, 2), at::randn({33}).slice(0, 1), at::randn({}),
      at::randn({0, 4})};
  std::vector<at::Tensor> dsts;
  for (auto& s : srcs) dsts.push_back(at::empty_like(s));
  batched_copy(dsts, srcs);
  for (size_t i = 0; i < srcs.size(); ++i) expect(same_bytes(dsts[i], srcs[i]), "strided copy");
}

void test_every_element_size() {
  for (auto dtype : {at::kByte, at::kShort, at::kFloat, at::kDouble, at::kComplexDouble}) {
    auto src = at::randint(0, 100, {6, 10}).to(dtype).t();
    auto dst = at::zeros({10, 6}, at::TensorOptions().dtype(dtype)).t().contiguous().t();
    batched_copy({dst}, {src});
    expect(same_bytes(dst, src), "element size copy");
  }
}

void test_parallel_split_of_one_big_strided_tensor() {
  // Bigger than the grain, so threads cut one strided entry at element boundaries.
  auto src = at::randn({1024, 1031}).t();
  auto dst = at::empty_like(src);
  batched_copy({dst}, {src});
  expect(same_bytes(dst, src), "big strided copy");
}

void test_plan_rejects_before_writing() {
  auto d = at::zeros({4});
  expect_throws([&] { batched_copy({d, d}, {at::ones({4}), at::ones({4})}); }, "overlaps", "overlap");
  expect(at::equal(d, at::zeros({4})), "nothing written after overlap error");
  expect_throws([&] { batched_copy({d}, {at::ones({4}, at::kDouble)}); }, "pair 0: dtype mismatch", "dtype");
  auto row = at::zeros({5});
  expect_throws([&] { batched_copy({row.slice(0, 1)}, {row.slice(0, 0, 4)}); }, "must not alias", "alias");
  expect(at::equal(row, at::zeros({5})), "nothing written after alias error");
}

// Which kind of refusal `fn` raised: declined (c10::NotImplementedError, which Python
// callers may retry pair by pair or per device), invalid (any other c10::Error), none.
enum class Raised { kNothing, kDeclined, kInvalid };

template <typename Fn>
Raised refusal_of(Fn fn) {
  try {
    fn();
  } catch (const c10::NotImplementedError&) {
    return Raised::kDeclined;
  } catch (const c10::Error&) {
    return Raised::kInvalid;
  }
  return Raised::kNothing;
}

void test_refusals_say_whether_a_pair_by_pair_copy_would_serve() {
  auto d = at::zeros({4});
  auto wide = at::zeros({3, 4});
  const auto ones = at::ones({4});
  expect(refusal_of([&] { batched_copy({d, d}, {ones, ones}); }) == Raised::kDeclined, "tied destination declined");
  expect(refusal_of([&] { batched_copy({d}, {at::ones({4}, at::kDouble)}); }) == Raised::kDeclined,
         "dtype mismatch declined");
  expect(refusal_of([&] { batched_copy({d}, {at::ones({2})}); }) == Raised::kDeclined, "shape mismatch declined");
  expect(refusal_of([&] {
           batched_copy({wide.slice(1, 0, 2), wide.slice(1, 1, 3)}, {at::ones({3, 2}), at::ones({3, 2})});
         }) == Raised::kDeclined,
         "strided overlap declined");
  expect(refusal_of([&] { batched_copy({at::zeros({1}).expand({4})}, {ones}); }) == Raised::kInvalid,
         "self-overlapping destination invalid");
  expect(at::equal(d, at::zeros({4})) && at::equal(wide, at::zeros({3, 4})), "nothing written after a refusal");
  // The planners of the other ops keep plain errors for their overlaps.
  auto out = at::zeros({16}, at::kByte);
  expect(refusal_of([&] { sdict_ext::plan_pack({out.slice(0, 0, 4)}, {0}, out); }) == Raised::kInvalid,
         "pack overlap invalid");
}

// A tensor copied onto itself is a no-op (at::Tensor::copy_ returns at once), through
// the dense and the strided planners; its destination still conflicts with others'.
void test_self_copy_is_a_no_op() {
  auto m = at::arange(12, at::kFloat).view({3, 4});
  auto col = m.slice(1, 1, 3);
  auto want = m.clone();
  batched_copy({m}, {m});
  batched_copy({col}, {col});
  auto other = at::zeros({2});
  batched_copy({other, m}, {at::ones({2}), m});
  expect(at::equal(m, want) && at::equal(other, at::ones({2})), "self copy is a no-op");
  expect_throws([&] { batched_copy({m, m}, {m, at::zeros({3, 4})}); }, "overlaps destination", "self copy, same dst");
  expect_throws([&] { batched_copy({col, col}, {col, at::zeros({3, 2})}); }, "overlaps destination",
                "strided self copy, same dst");
  expect(at::equal(m, want), "nothing written after a self copy's conflict");
}

// pack writes every byte of out: the slots, zeros between and after them.
void test_pack_zeroes_gaps() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdict_ext::pack_into", "")
                       .typed<void(at::TensorList, at::IntArrayRef, const at::Tensor&)>();
  std::vector<at::Tensor> ts = {at::ones({3}, at::kChar), at::ones({5}, at::kShort), at::ones({2, 3}).t()};
  const std::vector<int64_t> offsets = {48, 0, 16};  // gaps 10..16, 40..48, 51..64
  auto out = at::full({64}, 0x7F, at::kByte);
  op.call(ts, offsets, out);
  auto want = at::zeros({64}, at::kByte);
  want.slice(0, 48, 51).copy_(ts[0].view(at::kByte));
  want.slice(0, 0, 10).copy_(ts[1].view(at::kByte));
  want.slice(0, 16, 40).copy_(ts[2].contiguous().view(-1).view(at::kByte));
  expect(at::equal(out, want), "pack zeroes the gaps and the tail");
}

void test_chunk_range_follows_torch_chunk() {
  // torch.chunk(arange(5), 4): [0,1] [2,3] [4] [] -> starts 0 2 4 5.
  const int64_t starts[] = {0, 2, 4, 5};
  const int64_t lens[] = {2, 2, 1, 0};
  for (int64_t r = 0; r < 4; ++r) {
    auto [s, n] = sdict_ext::chunk_range(5, 4, r);
    expect(s == starts[r] && n == lens[r], "chunk_range");
  }
}

void test_gather_concat_dim1() {
  auto full = at::arange(30, at::kFloat).view({5, 6});
  auto chunks = full.chunk(4, 1);  // widths 2 2 2, then an empty 4th
  auto gathered = at::zeros({4 * 10});
  for (size_t r = 0; r < chunks.size(); ++r) {
    gathered.slice(0, r * 10, r * 10 + chunks[r].numel()).copy_(chunks[r].reshape(-1));
  }
  auto out = at::empty({5, 6});
  sdict_ext::execute_plan_cpu(sdict_ext::plan_gather_concat(gathered, 10, 4, out, 1));
  expect(at::equal(out, full), "gather_concat dim 1");
}

// check_dense_overlap on hand-made byte ranges: ranges that only touch are disjoint,
// sources may overlap sources, and a destination is caught overlapping a range that is
// not its neighbour in address order, whatever the order the pairs come in.
void test_dense_overlap_sweep() {
  using sdict_ext::ByteSpan;
  using sdict_ext::DenseSpans;
  auto spans_of = [](const std::vector<std::pair<uintptr_t, uintptr_t>>& dst,
                     const std::vector<std::pair<uintptr_t, uintptr_t>>& src) {
    DenseSpans s;
    for (size_t i = 0; i < dst.size(); ++i) s.dst.push_back({dst[i].first, dst[i].second, int64_t(i)});
    for (size_t i = 0; i < src.size(); ++i) s.src.push_back({src[i].first, src[i].second, int64_t(i)});
    return s;
  };
  auto ok = [&](DenseSpans s) {
    try {
      sdict_ext::check_dense_overlap(s, "test");
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  };
  // Touching destinations, sources overlapping each other, all out of order.
  expect(ok(spans_of({{300, 400}, {100, 200}, {200, 300}}, {{1000, 1100}, {1050, 1150}, {1000, 1100}})),
         "touching destinations and overlapping sources are allowed");
  // Destination 0 spans [100, 1000): it overlaps destination 2 at [500, 600) with
  // destination 1 between them in address order.
  expect(!ok(spans_of({{100, 1000}, {200, 300}, {500, 600}}, {{2000, 2100}, {3000, 3100}, {4000, 4100}})),
         "a wide destination overlapping several");
  // A source starting inside a destination that began much earlier.
  expect(!ok(spans_of({{100, 1000}, {2000, 2100}}, {{999, 1099}, {5000, 5100}})),
         "a source inside a destination's last byte");
  // A destination starting inside a long source.
  expect(!ok(spans_of({{6000, 6010}, {150, 160}}, {{7000, 7010}, {100, 200}})),
         "a destination inside a source");
  // Many runs (the run-merging sort) and no order at all (the full sort), disjoint.
  std::vector<std::pair<uintptr_t, uintptr_t>> dst;
  std::vector<std::pair<uintptr_t, uintptr_t>> src;
  for (uintptr_t block = 0; block < 8; ++block) {
    for (uintptr_t k = 0; k < 500; ++k) {
      const uintptr_t lo = 1'000'000 + ((7 - block) * 500 + k) * 64;
      dst.push_back({lo, lo + 64});
      const uintptr_t slo = 9'000'000 + ((k * 7919) % 4000) * 64;
      src.push_back({slo, slo + 64});
    }
  }
  expect(ok(spans_of(dst, src)), "4,000 disjoint pairs in runs and in no order");
  dst.push_back({1'000'000 + 1234 * 64 + 8, 1'000'000 + 1234 * 64 + 16});
  src.push_back({100, 108});
  expect(!ok(spans_of(dst, src)), "one overlap among 4,001 pairs");
}

// Boxes of our own tensors read through process_vm_readv (this process is its own
// "remote"): every box of a 3-d tensor, against narrow().
void test_read_process_boxes_matches_narrow() {
  const at::Tensor src = at::arange(3 * 4 * 5, at::kInt).reshape({3, 4, 5});
  std::vector<at::Tensor> dsts;
  std::vector<sdict_ext::RemoteBox> boxes;
  std::vector<std::vector<int64_t>> where;
  for (int64_t a = 0; a <= 3; ++a)
    for (int64_t b = 1; b <= 4; ++b)
      for (int64_t c = 1; c <= 5; ++c)
        for (int64_t i = 0; i + a <= 3; ++i)
          for (int64_t j = 0; j + b <= 4; ++j)
            for (int64_t k = 0; k + c <= 5; k += 2) {
              dsts.push_back(at::full({a, b, c}, -1, at::kInt));
              sdict_ext::RemoteBox box;
              box.addr = reinterpret_cast<std::uint64_t>(src.data_ptr());
              box.full = {3, 4, 5};
              box.start = {i, j, k};
              box.size = {a, b, c};
              box.itemsize = 4;
              box.dst = a == 0 ? nullptr : static_cast<char*>(dsts.back().data_ptr());
              boxes.push_back(box);
              where.push_back({i, j, k});
            }
  int64_t expected = 0;
  for (const auto& d : dsts) expected += d.numel() * 4;
  expect(sdict_ext::read_process_boxes(getpid(), boxes) == expected, "read_process_boxes byte count");
  for (size_t n = 0; n < dsts.size(); ++n) {
    const auto& w = where[n];
    const at::Tensor ref = src.narrow(0, w[0], dsts[n].size(0)).narrow(1, w[1], dsts[n].size(1))
                               .narrow(2, w[2], dsts[n].size(2));
    expect(at::equal(dsts[n], ref), "read_process_boxes box equals narrow");
  }
  sdict_ext::RemoteBox out_of_range = boxes.back();
  out_of_range.start = {3, 0, 0};
  out_of_range.size = {1, 1, 1};
  expect_throws([&] { sdict_ext::read_process_boxes(getpid(), {out_of_range}); }, "leaves dim 0",
                "read_process_boxes rejects a box outside its tensor");
}

// Bounds near 2^63 (offsets, starts, packed shapes, world sizes, strides): every plan
// raises instead of letting a sum or product wrap (UBSan flags any that still does).
void test_bounds_near_int64_max_are_refused() {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  using sdict_ext::checked_extent;
  using sdict_ext::range_fits;
  expect(range_fits(0, 8, 8) && range_fits(8, 0, 8) && !range_fits(kMax - 7, 8, 64) &&
             !range_fits(-1, 1, 8) && !range_fits(kMax, kMax, kMax),
         "range_fits");
  const std::vector<int64_t> huge = {int64_t{1} << 62, int64_t{1} << 62};
  const std::vector<int64_t> empty = {0, kMax, kMax};
  const std::vector<int64_t> four = {2, 2};
  expect(checked_extent(huge) == -1 && checked_extent(empty) == 0 && checked_extent(four, 8) == 32,
         "checked_extent");
  auto [start, len] = sdict_ext::chunk_range(kMax, kMax, kMax - 1);
  expect(start == kMax - 1 && len == 1, "chunk_range at int64 max");
  std::tie(start, len) = sdict_ext::chunk_range(kMax, 2, 5);
  expect(start == kMax && len == 0, "chunk_range past the end");

  const auto flat = at::arange(64, at::kByte);
  std::vector<at::Tensor> dst = {at::zeros({2})};
  const std::vector<int64_t> off_end = {kMax - 7};
  expect_throws([&] { sdict_ext::plan_unpack(flat, off_end, dst, c10::nullopt, c10::nullopt); }, "lies outside flat",
                "unpack offset whose end wraps");
  std::vector<at::Tensor> box = {at::zeros({1, 2}, at::kByte)};
  const std::vector<int64_t> zero = {0};
  const std::vector<int64_t> full = {2, 2};
  const std::vector<int64_t> far = {kMax, 0};
  expect_throws([&] { sdict_ext::plan_unpack(flat, zero, box, full, far); }, "does not fit in the packed shape",
                "unpack start whose end wraps");
  std::vector<at::Tensor> one = {at::zeros({1, 1}, at::kByte)};
  const std::vector<int64_t> origin = {0, 0};
  expect_throws([&] { sdict_ext::plan_unpack(flat, zero, one, huge, origin); }, "more bytes than an int64",
                "unpack packed shape whose size wraps");
  auto out = at::full({64}, 7, at::kByte);
  const std::vector<at::Tensor> src = {at::ones({2})};
  const std::vector<int64_t> off_pack = {kMax - 3};
  expect_throws([&] { sdict_ext::plan_pack(src, off_pack, out); }, "does not fit in out",
                "pack offset whose end wraps");
  auto gathered = at::arange(8, at::kByte);
  auto gc_out = at::empty({8}, at::kByte);
  expect_throws([&] { sdict_ext::plan_gather_concat(gathered, int64_t{1} << 62, 4, gc_out, 0); },
                "fewer than world_size * chunk_numel", "gather_concat world_size * chunk_numel wraps");
  // An empty output with a world size no loop could walk: nothing to plan, at once.
  auto none = at::empty({0, 3}, at::kByte);
  expect(sdict_ext::plan_gather_concat(at::empty({0}, at::kByte), 0, kMax, none, 0).empty(),
         "gather_concat of nothing over int64-max ranks");

  sdict_ext::RemoteBox rb;
  rb.addr = 4096;
  rb.full = {16};
  rb.start = {kMax};
  rb.size = {1};
  rb.itemsize = 1;
  char byte = 0;
  rb.dst = &byte;
  expect_throws([&] { sdict_ext::read_process_boxes(getpid(), {rb}); }, "leaves dim 0", "remote box start wraps");
  rb.full = huge;
  rb.start = origin;
  rb.size = {1, 1};
  expect_throws([&] { sdict_ext::read_process_boxes(getpid(), {rb}); }, "address space", "remote tensor size wraps");
  rb.full = {16};
  rb.start = {0};
  rb.size = {1};
  rb.addr = ~std::uint64_t{0} - 4;
  expect_throws([&] { sdict_ext::read_process_boxes(getpid(), {rb}); }, "address space", "remote address wraps");
}

// read_samples: windows of our own tensors read back as they are; an address a page
// off, or unmapped, reads other bytes or is refused, and never raises.
void test_read_samples_tells_refused_ranges() {
  const at::Tensor a = at::arange(4096, at::kInt);
  const at::Tensor b = at::arange(3, at::kByte);
  const auto pa = reinterpret_cast<std::uint64_t>(a.data_ptr());
  const auto pb = reinterpret_cast<std::uint64_t>(b.data_ptr());
  std::vector<char> first(4 * sdict_ext::kSampleBytes);
  std::vector<char> second(4 * sdict_ext::kSampleBytes);
  const std::vector<std::uint64_t> ids = {0, 1, 2, 3};
  // (The first range stops a page short of a's end, so that a page further it stays in a.)
  const auto n = static_cast<int64_t>(a.nbytes()) - 4096;
  const auto ok1 = sdict_ext::read_samples(getpid(), {pa, pb, 4096, pa}, {n, 3, 64, 0}, ids, 7, first.data());
  expect(ok1 == std::vector<bool>({true, true, false, false}), "read_samples flags");
  const auto ok2 = sdict_ext::read_samples(getpid(), {pa + 4096, pb}, {n, 3}, {0, 1}, 7, second.data());
  expect(ok2 == std::vector<bool>({true, true}), "read_samples of a shifted range");
  expect(std::memcmp(first.data(), second.data(), sdict_ext::kSampleBytes) != 0, "a page off reads other bytes");
  expect(std::memcmp(first.data() + sdict_ext::kSampleBytes, second.data() + sdict_ext::kSampleBytes,
                     sdict_ext::kSampleBytes) == 0,
         "the same range reads the same samples");
}

}  // namespace

int main() {
  test_bounds_near_int64_max_are_refused();
  test_read_samples_tells_refused_ranges();
  test_read_process_boxes_matches_narrow();
  test_dense_overlap_sweep();
  test_strided_and_dense_copies();
  test_every_element_size();
  test_parallel_split_of_one_big_strided_tensor();
  test_plan_rejects_before_writing();
  test_refusals_say_whether_a_pair_by_pair_copy_would_serve();
  test_self_copy_is_a_no_op();
  test_pack_zeroes_gaps();
  test_chunk_range_follows_torch_chunk();
  test_gather_concat_dim1();
  if (failures == 0) std::printf("all CPU kernel tests passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
