// read_process_boxes: boxes of another process's tensors, read with process_vm_readv.
//
// The kernel copies straight from the remote pages into ours: one copy per byte, done by
// this (the receiving) process alone, while the owner goes on with its own work. Runs of
// many boxes travel in one call (up to IOV_MAX iovecs a side), adjacent runs merged, so a
// state dict of thousands of tensors costs a handful of system calls.
#include "sdict_ext/remote_read.h"

#include <c10/util/Exception.h>

#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

namespace sdict_ext {

namespace {

constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux: the most iovecs process_vm_readv takes

std::string cause_of(int err) {
  switch (err) {
    case EPERM:
      return "this process may not read the source's memory (ptrace access: a different user, "
             "or Yama ptrace_scope); set SDICT_EXT_DIRECT_READ=0 to send the bytes through the "
             "process group instead";
    case ESRCH:
      return "the source process is gone";
    case EFAULT:
      return "an address is not mapped in the source process (its tensor was freed or moved "
             "while being read)";
    case ENOSYS:
      return "process_vm_readv is not available here (kernel or seccomp); set "
             "SDICT_EXT_DIRECT_READ=0";
    default:
      return std::strerror(err);
  }
}

// Drops `n` bytes from the front of iovs[first:count].
void advance(iovec* iovs, size_t& first, size_t count, size_t n) {
  while (n > 0 && first < count) {
    if (n >= iovs[first].iov_len) {
      n -= iovs[first].iov_len;
      ++first;
    } else {
      iovs[first].iov_base = static_cast<char*>(iovs[first].iov_base) + n;
      iovs[first].iov_len -= n;
      n = 0;
    }
  }
}

inline char* end_of(const iovec& v) {
  return static_cast<char*>(v.iov_base) + v.iov_len;
}

class Batch {
 public:
  explicit Batch(pid_t pid) : pid_(pid) {}

  void add(std::uint64_t remote, char* local, size_t n, size_t box) {
    if (n == 0) return;
    char* far = reinterpret_cast<char*>(remote);
    bool merge_remote = nr_ > 0 && end_of(remote_[nr_ - 1]) == far && remote_[nr_ - 1].iov_len + n <= kMaxRun;
    bool merge_local = nl_ > 0 && end_of(local_[nl_ - 1]) == local && local_[nl_ - 1].iov_len + n <= kMaxRun;
    // Both sides must carry the same bytes into a call: flush before either overflows.
    if ((!merge_remote && nr_ == kMaxIov) || (!merge_local && nl_ == kMaxIov)) {
      flush();
      merge_remote = merge_local = false;
    }
    if (merge_remote) {
      remote_[nr_ - 1].iov_len += n;
    } else {
      remote_[nr_++] = {far, n};
    }
    if (merge_local) {
      local_[nl_ - 1].iov_len += n;
    } else {
      local_[nl_++] = {local, n};
    }
    last_box_ = box;
    bytes_ += static_cast<int64_t>(n);
  }

  void flush() {
    size_t lf = 0;
    size_t rf = 0;
    while (lf < nl_ || rf < nr_) {
      const ssize_t got = process_vm_readv(pid_, local_ + lf, nl_ - lf, remote_ + rf, nr_ - rf, 0);
      if (got < 0 && errno == EINTR) continue;
      const int err = got < 0 ? errno : EFAULT;
      TORCH_CHECK(got > 0, "sdict_ext.read_process_boxes: reading process ", pid_, " at 0x", std::hex,
                  reinterpret_cast<std::uintptr_t>(remote_[rf].iov_base), std::dec, " (box ", last_box_,
                  " or one before it in the same call) failed: ", cause_of(err), " (errno ", err, ")");
      advance(local_, lf, nl_, static_cast<size_t>(got));
      advance(remote_, rf, nr_, static_cast<size_t>(got));
    }
    nl_ = nr_ = 0;
  }

  int64_t bytes() const { return bytes_; }

 private:
  // A run the kernel moves in one go (it stops at MAX_RW_COUNT, just under 2 GiB).
  static constexpr size_t kMaxRun = size_t{1} << 30;
  pid_t pid_;
  iovec local_[kMaxIov];
  iovec remote_[kMaxIov];
  size_t nl_ = 0;
  size_t nr_ = 0;
  size_t last_box_ = 0;
  int64_t bytes_ = 0;
};

}  // namespace

int64_t read_process_boxes(pid_t pid, const std::vector<RemoteBox>& boxes) {
  // Every box is checked before anything is read.
  for (size_t i = 0; i < boxes.size(); ++i) {
    TORCH_CHECK(check_box(boxes[i]) || boxes[i].dst != nullptr, "sdict_ext.read_process_boxes: box ", i,
                " has no destination");
  }
  auto batch = std::make_unique<Batch>(pid);
  for (size_t i = 0; i < boxes.size(); ++i) {
    const RemoteBox& box = boxes[i];
    char* cursor = box.dst;
    visit_box_runs(box, [&](int64_t offset, int64_t n) {
      // Runs over kMaxRun are cut so that merging never builds one the kernel would stop in.
      for (int64_t done = 0; done < n;) {
        const int64_t part = std::min<int64_t>(n - done, int64_t{1} << 30);
        batch->add(box.addr + static_cast<std::uint64_t>(offset + done), cursor, static_cast<size_t>(part), i);
        cursor += part;
        done += part;
      }
    });
  }
  batch->flush();
  return batch->bytes();
}

}  // namespace sdict_ext
