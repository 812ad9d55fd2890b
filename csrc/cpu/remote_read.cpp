// read_process_boxes: boxes of another process's tensors, read with process_vm_readv.
//
// The kernel copies straight from the remote pages into ours: one copy per byte, done by
// this (the receiving) process alone, while the owner goes on with its own work. Runs of
// many boxes travel in one call (up to IOV_MAX iovecs a side), adjacent runs merged, so a
// state dict of thousands of tensors costs a handful of system calls.
//
// process_vm_readv is Linux's alone: the rest of the build must not depend on it (a
// macOS CPU build), so everything that calls it is behind __linux__, and the #else
// branch at the end raises instead (kDirectReadAvailable is false there, which is how
// callers learn it without trying).
#include "sdict_ext/remote_read.h"

#include <c10/util/Exception.h>

#if defined(__linux__)

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
             "or Yama ptrace_scope); unset SDICT_EXT_DIRECT_READ (direct reads are opt-in) to send "
             "the bytes through the process group instead";
    case ESRCH:
      return "the source process is gone";
    case EFAULT:
      return "an address is not mapped in the source process (its tensor was freed or moved "
             "while being read)";
    case ENOSYS:
      return "process_vm_readv is not available here (kernel or seccomp); unset "
             "SDICT_EXT_DIRECT_READ";
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

// A 64-bit mix of (seed, i) (splitmix64's finaliser): a sample position rank 0 and the
// reader both draw, which no fixed offset error lines up with.
std::uint64_t mix(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// One readv of iovs[0:count] on each side; whether it moved every byte.
bool read_all(pid_t pid, iovec* local, iovec* remote, size_t count, size_t total) {
  ssize_t got = -1;
  do {
    got = process_vm_readv(pid, local, count, remote, count, 0);
  } while (got < 0 && errno == EINTR);
  return got >= 0 && static_cast<size_t>(got) == total;
}

}  // namespace

std::vector<bool> read_samples(pid_t pid, const std::vector<std::uint64_t>& addrs,
                               const std::vector<int64_t>& nbytes, const std::vector<std::uint64_t>& ids,
                               std::uint64_t seed, char* out) {
  TORCH_CHECK(addrs.size() == nbytes.size() && ids.size() == addrs.size(),
              "sdict_ext.read_samples: one byte count and one id per address");
  const size_t n = addrs.size();
  std::memset(out, 0, n * kSampleBytes);
  std::vector<bool> ok(n, false);
  constexpr size_t kPerCall = kMaxIov / 2;  // two windows a range
  std::vector<iovec> local(kMaxIov);
  std::vector<iovec> remote(kMaxIov);
  std::vector<size_t> members;  // the ranges of this call
  std::vector<size_t> bytes;    // and their window bytes
  for (size_t first = 0; first < n;) {
    members.clear();
    bytes.clear();
    size_t count = 0;
    size_t total = 0;
    for (; first < n && members.size() < kPerCall; ++first) {
      const int64_t len = nbytes[first];
      std::uint64_t end = 0;
      if (len <= 0 || addrs[first] == 0 ||
          __builtin_add_overflow(addrs[first], static_cast<std::uint64_t>(len), &end)) {
        continue;
      }
      const auto w = static_cast<size_t>(std::min<int64_t>(len, 8));
      const std::uint64_t span = static_cast<std::uint64_t>(len) - w + 1;
      const std::uint64_t at[2] = {static_cast<std::uint64_t>(len) - w, mix(seed, ids[first]) % span};
      char* dst = out + first * kSampleBytes;
      for (int k = 0; k < 2; ++k) {
        local[count] = {dst + 8 * k, w};
        remote[count] = {reinterpret_cast<void*>(addrs[first] + at[k]), w};
        ++count;
      }
      members.push_back(first);
      bytes.push_back(2 * w);
      total += 2 * w;
    }
    if (members.empty()) continue;
    if (read_all(pid, local.data(), remote.data(), count, total)) {
      for (size_t m : members) ok[m] = true;
      continue;
    }
    // Some window was refused: find which range's, one range at a time (an error path).
    size_t at = 0;
    for (size_t k = 0; k < members.size(); ++k) {
      ok[members[k]] = read_all(pid, local.data() + at, remote.data() + at, 2, bytes[k]);
      if (!ok[members[k]]) std::memset(out + members[k] * kSampleBytes, 0, kSampleBytes);
      at += 2;
    }
  }
  return ok;
}

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

#else  // !defined(__linux__)

namespace sdict_ext {

namespace {

constexpr const char* kNoDirectRead =
    ": reading another process's memory needs Linux (process_vm_readv); this build has no "
    "direct read (sdict_ext.ops.direct_read_available() is False): send the bytes through "
    "the process group instead";

}  // namespace

std::vector<bool> read_samples(pid_t /*pid*/, const std::vector<std::uint64_t>& /*addrs*/,
                               const std::vector<int64_t>& /*nbytes*/, const std::vector<std::uint64_t>& /*ids*/,
                               std::uint64_t /*seed*/, char* /*out*/) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "sdict_ext.read_samples", kNoDirectRead);
}

int64_t read_process_boxes(pid_t /*pid*/, const std::vector<RemoteBox>& /*boxes*/) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "sdict_ext.read_process_boxes", kNoDirectRead);
}

}  // namespace sdict_ext

#endif  // defined(__linux__)
