// Shared glue of the CUDA ops: the device checks, and the execution of a copy plan
// whose copies may touch device, pinned host and pageable host memory.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "sdict_ext/copy_plan.h"

namespace sdict_ext {

// The tensors of one op call. Each must be on the call's one CUDA device or on the
// host; `run` then routes every copy of the op's plan by the memory on its two sides.
class CudaCall {
 public:
  explicit CudaCall(const char* op) : op_(op) {}

  // Registers a tensor the plan reads or writes; `what` and `index` (-1: none) name
  // it in error messages.
  void add(const at::Tensor& t, const char* what, int64_t index = -1);
  void add(at::TensorList tensors, const char* what);

  // Executes `plan` on the current stream of the call's device:
  // - device <-> device, and small or strided copies whose host side is mapped
  //   pinned memory: one launch of the copy kernel (on a few blocks when every copy
  //   of the launch crosses PCIe);
  // - big strided copies whose host side is one contiguous run of mapped pinned
  //   memory: the kernel gathers into (or scatters from) a contiguous device
  //   temporary, the copy engines move it in one transfer;
  // - dense copies with pinned host memory: the copy engines, asynchronously;
  // - dense copies with pageable host memory: through two pinned buckets, the CPU's
  //   memcpy of one overlapping the engines' transfer of the other; returns once the
  //   pageable side is done with;
  // - strided copies whose host side cannot be mapped: at::Tensor::copy_;
  // - host <-> host: the CPU backend, while the device works.
  // With non_blocking=false, returns once copies involving the host have finished;
  // device-only copies never wait (as with at::Tensor::copy_). Refuses to run while
  // the stream is being captured into a CUDA graph.
  void run(const std::vector<CopyEntry>& plan, bool non_blocking);

 private:
  // One host allocation some tensor of the call lives in.
  struct HostStorage {
    uintptr_t lo = 0;
    uintptr_t hi = 0;
    void* ctx = nullptr;  // the allocator's context, for record_event
    bool queried = false;
    bool pinned = false;
    char* mapped = nullptr;  // device alias of lo, when mapped
    bool used = false;       // pinned and touched by asynchronous work of this call
  };
  struct Routes;

  void index_hosts();
  HostStorage* find_host(const void* p);
  HostStorage& describe(HostStorage& h);
  Routes route(const std::vector<CopyEntry>& plan);
  void copy_with_torch(const CopyEntry& e, bool non_blocking);

  const char* op_;
  std::optional<c10::Device> device_;
  std::string first_cuda_;  // names the tensor that fixed device_, for messages
  std::vector<HostStorage> hosts_;
};

}  // namespace sdict_ext
