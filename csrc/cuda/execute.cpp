#include "execute.h"

#include <ATen/ATen.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <sstream>

#include "sdict_ext/cpu.h"
#include "sdict_ext/cuda_copy.h"
#include "sdict_ext/tuning.h"

namespace sdict_ext {

struct CudaCall::Routes {
  std::vector<KernelCopy> kernel;        // one launch of the copy kernel
  std::vector<EngineCopy> pinned;        // copy engines, asynchronous
  std::vector<EngineCopy> pageable_d2h;  // through pinned buckets, see copy_via_buckets
  std::vector<EngineCopy> pageable_h2d;
  std::vector<CopyEntry> host;           // the CPU backend
  std::vector<size_t> fallback;          // plan indices for at::Tensor::copy_
  // Strided copies whose host side is one contiguous run of mapped pinned memory, too
  // big for the kernel to move across PCIe element by element (see run).
  struct Staged {
    size_t index;    // in the plan
    int64_t offset;  // in the device temporary
    bool to_host;
  };
  std::vector<Staged> staged;
  int64_t staged_bytes = 0;
  int64_t kernel_pcie = 0;  // kernel copies that read or write mapped host memory
  bool crosses = false;     // some copy moves data between host and device
};

namespace {

std::string tensor_name(const char* what, int64_t index) {
  std::ostringstream os;
  os << what;
  if (index >= 0) os << " " << index;
  return os.str();
}

KernelCopy kernel_copy(const CopyEntry& e, const char* src, char* dst) {
  KernelCopy k;
  k.src = src;
  k.dst = dst;
  k.elem_size = e.elem_size;
  k.ndim = static_cast<int64_t>(e.sizes.size());
  k.sizes = e.sizes.data();
  k.src_strides = e.src_strides.data();
  k.dst_strides = e.dst_strides.data();
  return k;
}

// The bytes one side of `e` covers, as a uint8 tensor with a trailing dim of
// elem_size: any element size is copied exactly, without a dtype to pick.
at::Tensor byte_view(const char* ptr, const CopyEntry& e, c10::IntArrayRef strides, c10::Device device) {
  c10::SmallVector<int64_t, 7> sizes(e.sizes.begin(), e.sizes.end());
  sizes.push_back(e.elem_size);
  c10::SmallVector<int64_t, 7> byte_strides(strides.begin(), strides.end());
  byte_strides.push_back(1);
  return at::from_blob(
      const_cast<char*>(ptr), sizes, byte_strides, at::TensorOptions().dtype(at::kByte).device(device));
}

// Whether one side of `e` is a single row-major run of nbytes() bytes (so one
// copy-engine transfer can move it whatever the other side's layout).
bool row_major(const CopyEntry& e, c10::IntArrayRef strides) {
  int64_t expected = e.elem_size;
  for (size_t k = e.sizes.size(); k-- > 0;) {
    if (e.sizes[k] != 1 && strides[k] != expected) return false;
    expected *= e.sizes[k];
  }
  return true;
}

// A CUDA event created on first record (ATen's CUDAEvent header pulls in the CUDA
// math libraries' headers, which the glue does not otherwise need).
class Event {
 public:
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);  // safe while pending
  }
  void record(cudaStream_t stream) {
    if (event_ == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  void synchronize() {
    if (event_ != nullptr) C10_CUDA_CHECK(cudaEventSynchronize(event_));
  }

 private:
  cudaEvent_t event_ = nullptr;
};

// Copies between device memory and pageable host memory through pinned buckets: one
// batched copy-engine command per bucket instead of one synchronous cudaMemcpyAsync per
// tensor (which the runtime stages through its own small buffer, waiting each time),
// with the CPU's memcpy of one bucket overlapping the engines' transfer of the next.
// Returns once device->host copies have landed and host->device sources were read
// (pageable memory never outlives the call's use of it); the device side stays
// stream-ordered.
void copy_via_buckets(const std::vector<EngineCopy>& copies, bool to_host, const c10::cuda::CUDAStream& stream) {
  int64_t total = 0;
  for (const EngineCopy& c : copies) total += align16(static_cast<int64_t>(c.bytes));
  const int64_t capacity = std::min<int64_t>(kPageableBucketBytes, total);
  if (capacity == 0) return;
  const std::vector<BucketPiece> pieces = plan_buckets(copies.data(), copies.size(), to_host, capacity);
  // Pieces come in bucket order: bucket b is pieces [starts[b], starts[b + 1]).
  std::vector<size_t> starts;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (i == 0 || pieces[i].bucket != pieces[i - 1].bucket) starts.push_back(i);
  }
  starts.push_back(pieces.size());
  const int64_t count = static_cast<int64_t>(starts.size()) - 1;
  at::Tensor buffers[2];
  Event drained[2];
  for (int64_t b = 0; b < std::min<int64_t>(count, 2); ++b) {
    buffers[b] = at::empty({capacity}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  // Bucket b's pieces as copies between their slots in buffer b % 2 and their device
  // (`device_side`) or host side, built by `make(dst, src, bytes)`: the engines fill the
  // slots from the device and the CPU empties them into the host for device->host, and
  // the other way round for host->device.
  const auto bucket_copies = [&](int64_t b, bool device_side, auto make) {
    char* base = static_cast<char*>(buffers[b % 2].mutable_data_ptr());
    std::vector<decltype(make(base, base, int64_t{0}))> out;
    out.reserve(starts[b + 1] - starts[b]);
    for (size_t i = starts[b]; i < starts[b + 1]; ++i) {
      const BucketPiece& p = pieces[i];
      char* slot = base + p.offset;
      char* far = device_side ? p.device : p.host;
      out.push_back(to_host == device_side ? make(slot, far, p.bytes) : make(far, slot, p.bytes));
    }
    return out;
  };
  const auto engines = [&](int64_t b) {
    const std::vector<EngineCopy> batch = bucket_copies(b, /*device_side=*/true, [](char* dst, char* src, int64_t n) {
      return EngineCopy{dst, src, static_cast<size_t>(n)};
    });
    C10_CUDA_CHECK(copy_engine_async(batch.data(), batch.size(), /*batch=*/true, stream.stream()));
    drained[b % 2].record(stream.stream());
  };
  const auto cpu = [&](int64_t b) {
    execute_plan_cpu(bucket_copies(b, /*device_side=*/false, [](char* dst, char* src, int64_t n) {
      return DenseCopy{src, dst, n};
    }));
  };
  if (to_host) {
    engines(0);
    for (int64_t b = 0; b < count; ++b) {
      // The next bucket's buffer was emptied by the CPU in the previous round.
      if (b + 1 < count) engines(b + 1);
      drained[b % 2].synchronize();
      cpu(b);
    }
  } else {
    for (int64_t b = 0; b < count; ++b) {
      if (b >= 2) drained[b % 2].synchronize();  // the engines have read this buffer
      cpu(b);
      engines(b);
    }
  }
  // Host->device transfers may still be reading the buffers: torch's pinned allocator
  // must not hand them out again before the stream is past them.
  for (int64_t b = 0; b < std::min<int64_t>(count, 2); ++b) {
    const c10::Storage& storage = buffers[b].storage();
    at::getHostAllocator(at::kCUDA)->record_event(storage.mutable_data(), storage.data_ptr().get_context(), stream);
  }
}

// Refuses to run while `stream` is being captured into a CUDA graph: the ops wait on
// the stream and upload a copy table from a pinned block that is recycled once the
// call returns, so a replay would read a stale table and write wherever it points.
void check_not_capturing(cudaStream_t stream, const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  // Asking about the legacy default stream while another stream captures in global
  // mode is itself an error: that capture is what it reports.
  const bool capturing = err == cudaErrorStreamCaptureImplicit || status != cudaStreamCaptureStatusNone;
  if (err == cudaErrorStreamCaptureImplicit) (void)cudaGetLastError();
  TORCH_CHECK(
      !capturing, op, ": called while a CUDA graph is being captured; its copies wait on the stream "
      "and read a copy table that is reused after the call, so they cannot be captured or replayed. "
      "Call it outside the capture (torch.compile's cudagraph trees skip sdict_ext ops, which are "
      "tagged cudagraph_unsafe)");
  C10_CUDA_CHECK(err);
}

void launch_kernel(
    const std::vector<KernelCopy>& copies, c10::Device device, cudaStream_t stream, bool pcie_only) {
  const CopyTableLayout layout = copy_table_layout(copies.data(), static_cast<int64_t>(copies.size()));
  at::Tensor staged = at::empty(
      {static_cast<int64_t>(layout.bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  fill_copy_table(copies.data(), layout, staged.mutable_data_ptr());
  // One asynchronous upload for the whole table. Going through copy_ makes torch's
  // pinned allocator record the stream, so the staging block is not handed out
  // again before the stream has read it; the device table is freed into this
  // stream's pool, so it too is reused only after the kernel.
  const at::Tensor table = staged.to(device, at::kByte, /*non_blocking=*/true);
  // A runtime call that failed earlier on this thread (e.g. a cudaHostRegister through
  // torch.cuda.cudart(), whose caller got the code and went on) leaves its error as the
  // thread's last error, which the launch check below would report as ours. Such an
  // error was already returned to its caller; a sticky one (a broken context) still
  // fails the launch itself.
  (void)cudaGetLastError();
  C10_CUDA_CHECK(launch_batched_copy_kernel(
      layout, table.const_data_ptr(), stream, pcie_only ? kCopyPcieMaxBlocks : 0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void CudaCall::add(const at::Tensor& t, const char* what, int64_t index) {
  const c10::Device device = t.device();
  if (device.is_cuda()) {
    if (!device_.has_value()) {
      device_ = device;
      first_cuda_ = tensor_name(what, index);
      return;
    }
    // Declined (Refusal::kDeclined, copy_plan.h): a call per device serves it.
    TORCH_CHECK_NOT_IMPLEMENTED(
        device == *device_, op_, ": ", tensor_name(what, index), " is on ", device, " but ", first_cuda_,
        " is on ", *device_, "; one call works on a single CUDA device (plus host memory), so split "
        "the call per device");
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      device.is_cpu(), op_, ": ", tensor_name(what, index), " is on ", device,
      "; expected the CPU or a CUDA device, move it there first");
  if (t.numel() == 0) return;
  const c10::Storage& storage = t.storage();
  const auto lo = reinterpret_cast<uintptr_t>(storage.data());
  hosts_.push_back(HostStorage{lo, lo + storage.nbytes(), storage.data_ptr().get_context()});
}

void CudaCall::add(at::TensorList tensors, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) add(tensors[i], what, static_cast<int64_t>(i));
}

void CudaCall::index_hosts() {
  std::sort(hosts_.begin(), hosts_.end(), [](const HostStorage& a, const HostStorage& b) {
    return a.lo < b.lo;
  });
  // Tensors sharing a storage (or views of one allocation through different
  // storages) collapse into one range, so a lookup needs one binary search.
  std::vector<HostStorage> merged;
  merged.reserve(hosts_.size());
  for (const HostStorage& h : hosts_) {
    if (!merged.empty() && h.lo < merged.back().hi) {
      merged.back().hi = std::max(merged.back().hi, h.hi);
    } else {
      merged.push_back(h);
    }
  }
  hosts_.swap(merged);
}

// Host and device addresses never collide (unified virtual addressing, which CUDA
// has on every 64-bit platform torch supports), so "inside a host tensor of this
// call" is exactly "host memory".
CudaCall::HostStorage* CudaCall::find_host(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = std::upper_bound(
      hosts_.begin(), hosts_.end(), addr, [](uintptr_t a, const HostStorage& h) { return a < h.lo; });
  if (it == hosts_.begin()) return nullptr;
  --it;
  return addr < it->hi ? &*it : nullptr;
}

// Asked lazily: host-only copies never pay for the runtime query.
CudaCall::HostStorage& CudaCall::describe(HostStorage& h) {
  if (!h.queried) {
    HostMemoryInfo info;
    C10_CUDA_CHECK(query_host_memory(reinterpret_cast<const void*>(h.lo), &info));
    h.pinned = info.pinned;
    h.mapped = static_cast<char*>(info.device_ptr);
    h.queried = true;
  }
  return h;
}

CudaCall::Routes CudaCall::route(const std::vector<CopyEntry>& plan) {
  Routes r;
  const CopyThresholds thresholds = copy_thresholds();
  for (size_t i = 0; i < plan.size(); ++i) {
    const CopyEntry& e = plan[i];
    HostStorage* dst_host = find_host(e.dst);
    if (e.src == nullptr) {
      // A zero fill (pack's gaps): the CPU writes host bytes, the copy kernel device
      // bytes, in the one launch with the copies.
      if (dst_host != nullptr) {
        r.host.push_back(e);
      } else {
        r.kernel.push_back(kernel_copy(e, nullptr, e.dst));
      }
      continue;
    }
    HostStorage* src_host = find_host(e.src);
    if (src_host != nullptr && dst_host != nullptr) {
      r.host.push_back(e);
      continue;
    }
    if (src_host == nullptr && dst_host == nullptr) {
      r.kernel.push_back(kernel_copy(e, e.src, e.dst));
      continue;
    }
    r.crosses = true;
    HostStorage& h = describe(dst_host != nullptr ? *dst_host : *src_host);
    h.used = h.used || h.pinned;
    const int64_t mapped_max =
        dst_host != nullptr ? thresholds.mapped_d2h_max_bytes : thresholds.mapped_h2d_max_bytes;
    const bool small = e.nbytes() < mapped_max;
    if (h.mapped != nullptr && !e.dense() && !small && r.staged_bytes + e.nbytes() <= kStridedStagingMaxBytes &&
        row_major(e, dst_host != nullptr ? e.dst_strides : e.src_strides)) {
      r.staged.push_back(Routes::Staged{i, r.staged_bytes, dst_host != nullptr});
      r.staged_bytes += align16(e.nbytes());
    } else if (h.mapped != nullptr && (!e.dense() || small)) {
      const auto alias = [&](const char* p) {
        return h.mapped + (reinterpret_cast<uintptr_t>(p) - h.lo);
      };
      r.kernel.push_back(kernel_copy(e, src_host ? alias(e.src) : e.src, dst_host ? alias(e.dst) : e.dst));
      ++r.kernel_pcie;
    } else if (e.dense()) {
      const EngineCopy c{e.dst, e.src, static_cast<size_t>(e.nbytes())};
      if (h.pinned) {
        r.pinned.push_back(c);
      } else {
        (dst_host != nullptr ? r.pageable_d2h : r.pageable_h2d).push_back(c);
      }
    } else {
      r.fallback.push_back(i);
    }
  }
  return r;
}

void CudaCall::copy_with_torch(const CopyEntry& e, bool non_blocking) {
  const c10::Device src_device = find_host(e.src) != nullptr ? c10::Device(c10::kCPU) : *device_;
  const c10::Device dst_device = find_host(e.dst) != nullptr ? c10::Device(c10::kCPU) : *device_;
  at::Tensor dst = byte_view(e.dst, e, e.dst_strides, dst_device);
  dst.copy_(byte_view(e.src, e, e.src_strides, src_device), non_blocking);
}

void CudaCall::run(const std::vector<CopyEntry>& plan, bool non_blocking) {
  if (plan.empty()) return;
  if (!device_.has_value()) {
    execute_plan_cpu(plan);
    return;
  }
  // Every refusal comes before the first write, as a plain c10::Error (RuntimeError):
  // callers may retry such a call split up (sdict_ext._copies). Once copies started,
  // failures are the device's or the allocator's own errors. Each plan entry gives at
  // most one kernel copy, so this bounds both launches' tables.
  TORCH_CHECK(
      plan.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()), op_, ": ", plan.size(),
      " copies in one call exceed the copy kernel's table; split the call");
  c10::cuda::OptionalCUDAGuard guard(device_);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device_->index());
  check_not_capturing(stream.stream(), op_);
  index_hosts();
  Routes r = route(plan);

  // Staged strided copies: the kernel gathers (or, after the engines, scatters) at HBM
  // speed on the device side, and the PCIe crossing is one copy-engine transfer of a
  // contiguous device temporary. The temporary is freed into this stream's pool, so it
  // is reused only by work ordered after these copies.
  at::Tensor temp;
  std::vector<KernelCopy> scatter;  // runs after the engines filled `temp`
  if (!r.staged.empty()) {
    temp = at::empty({r.staged_bytes}, at::TensorOptions().dtype(at::kByte).device(*device_));
    char* base = static_cast<char*>(temp.mutable_data_ptr());
    for (const auto& [i, offset, to_host] : r.staged) {
      const CopyEntry& e = plan[i];
      const size_t bytes = static_cast<size_t>(e.nbytes());
      if (to_host) {
        // Laid out with the host side's (row-major) strides: a dense image of it.
        r.kernel.push_back(kernel_copy(e, e.src, base + offset));
        r.pinned.push_back(EngineCopy{e.dst, base + offset, bytes});
      } else {
        r.pinned.push_back(EngineCopy{base + offset, e.src, bytes});
        scatter.push_back(kernel_copy(e, base + offset, e.dst));
      }
    }
  }
  // A table whose every copy crosses PCIe is bound by the link, not the SMs: a few
  // blocks reach its bandwidth and leave the rest of the device to training.
  const bool pcie_only = r.kernel_pcie == static_cast<int64_t>(r.kernel.size());
  if (!r.kernel.empty()) launch_kernel(r.kernel, *device_, stream.stream(), pcie_only);
  if (!r.pinned.empty()) {
    C10_CUDA_CHECK(copy_engine_async(r.pinned.data(), r.pinned.size(), /*batch=*/true, stream.stream()));
  }
  if (!scatter.empty()) launch_kernel(scatter, *device_, stream.stream(), /*pcie_only=*/false);
  // The CPU's share runs while the device works on the asynchronous part.
  if (!r.host.empty()) execute_plan_cpu(r.host);
  if (!r.pageable_d2h.empty()) copy_via_buckets(r.pageable_d2h, /*to_host=*/true, stream);
  if (!r.pageable_h2d.empty()) copy_via_buckets(r.pageable_h2d, /*to_host=*/false, stream);
  for (size_t i : r.fallback) copy_with_torch(plan[i], non_blocking);

  // Pinned blocks of torch's caching host allocator must not be handed out again
  // before this stream is done with them, even if the caller drops its tensors now.
  // Memory from elsewhere (cudaHostRegister) is not the allocator's: a no-op.
  for (const HostStorage& h : hosts_) {
    if (h.used) at::getHostAllocator(at::kCUDA)->record_event(reinterpret_cast<void*>(h.lo), h.ctx, stream);
  }
  if (r.crosses && !non_blocking) C10_CUDA_CHECK(cudaStreamSynchronize(stream.stream()));
}

}  // namespace sdict_ext
