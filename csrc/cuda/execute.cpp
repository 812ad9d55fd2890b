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
  std::vector<KernelCopy> kernel;    // one launch of the copy kernel
  std::vector<EngineCopy> pinned;    // copy engines, asynchronous
  std::vector<EngineCopy> pageable;  // copy engines, synchronous by CUDA's rules
  std::vector<CopyEntry> host;       // the CPU backend
  std::vector<size_t> fallback;      // plan indices for at::Tensor::copy_
  bool crosses = false;              // some copy moves data between host and device
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

void launch_kernel(
    const std::vector<KernelCopy>& copies, c10::Device device, cudaStream_t stream, const char* op) {
  TORCH_CHECK(
      copies.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()), op, ": ",
      copies.size(), " copies in one call exceed the copy kernel's table; split the call");
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
  C10_CUDA_CHECK(launch_batched_copy_kernel(layout, table.const_data_ptr(), stream));
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
    TORCH_CHECK(
        device == *device_, op_, ": ", tensor_name(what, index), " is on ", device, " but ", first_cuda_,
        " is on ", *device_, "; one call works on a single CUDA device (plus host memory), so split "
        "the call per device");
    return;
  }
  TORCH_CHECK(
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
    if (h.mapped != nullptr && (!e.dense() || e.nbytes() < mapped_max)) {
      const auto alias = [&](const char* p) {
        return h.mapped + (reinterpret_cast<uintptr_t>(p) - h.lo);
      };
      r.kernel.push_back(kernel_copy(e, src_host ? alias(e.src) : e.src, dst_host ? alias(e.dst) : e.dst));
    } else if (e.dense()) {
      (h.pinned ? r.pinned : r.pageable).push_back(EngineCopy{e.dst, e.src, static_cast<size_t>(e.nbytes())});
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
  c10::cuda::OptionalCUDAGuard guard(device_);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device_->index());
  index_hosts();
  const Routes r = route(plan);

  if (!r.kernel.empty()) launch_kernel(r.kernel, *device_, stream.stream(), op_);
  if (!r.pinned.empty()) {
    C10_CUDA_CHECK(copy_engine_async(r.pinned.data(), r.pinned.size(), /*batch=*/true, stream.stream()));
  }
  // The CPU's share runs while the device works on the asynchronous part.
  if (!r.host.empty()) execute_plan_cpu(r.host);
  if (!r.pageable.empty()) {
    C10_CUDA_CHECK(copy_engine_async(r.pageable.data(), r.pageable.size(), /*batch=*/false, stream.stream()));
  }
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
