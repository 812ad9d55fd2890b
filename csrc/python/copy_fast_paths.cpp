// Copy fast paths: batched_copy_ between plain CPU tensors, and the direct reads of
// another process's tensors (broadcast_state_dict's direct route).
//
// Bindings, not registered ops: batched_copy_cpu_fast borrows the tensors from their
// Python objects. Through torch.ops, a call with thousands of pairs spends most of its
// time turning the two Python lists into IValues and back, with a reference-count round
// trip (and a // From this many bytes the copy runs without the GIL: past this size the copy takes
// longer than the GIL handshake, so other Python threads (a trainer beside a stager)
// gain more than the release costs. handshake) per tensor; here only the plan and the copies remain. It
// declines (returns False) whenever the dispatcher could do something else with the
// call: a tensor subclass (DTensor, FakeTensor), a conjugate or negative view, a
// non-CPU tensor, an active dispatch or torch-function mode, a destination that
// autograd would refuse to write in place; the Python wrapper then takes the
// registered op, which has the fake kernel and opcheck. The direct reads take a
// process id and raw addresses in another process, which no tensor schema describes
// and no fake tensor could trace.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "bindings.h"
#include "sdict_ext/cpu.h"
#include "sdict_ext/remote_read.h"

#include <atomic>
#include <string>
#include <vector>

namespace sdict_ext {
namespace python {

namespace {

// A state dict's tensors are scattered over the heap, and by the time they are copied
// again their Python objects, TensorImpls and StorageImpls have left the cache: each
// pair is a chain of cache misses (object -> TensorImpl -> storage). So everything is
// read in ONE pass over the pairs (split into ranges over torch's threads), and each
// link is prefetched a few pairs ahead.
constexpr Py_ssize_t kObjectAhead = 12;
constexpr Py_ssize_t kImplAhead = 8;
constexpr Py_ssize_t kStorageAhead = 4;

// Pairs per thread below which scanning them is not worth a thread.
constexpr int64_t kScanGrainPairs = 2048;

// From this many bytes the copy runs without the GIL: past this size the copy takes
// longer than the GIL handshake, so other Python threads (a trainer beside a stager)
// gain more than the release costs.
constexpr int64_t kReleaseGilBytes = int64_t{1} << 20;

inline const c10::TensorImpl* impl_if_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? THPVariable_Unpack(obj).unsafeGetTensorImpl() : nullptr;
}

inline void prefetch_ahead(PyObject* list, Py_ssize_t i, Py_ssize_t n) {
  if (i + kObjectAhead < n) __builtin_prefetch(PyList_GET_ITEM(list, i + kObjectAhead));
  if (i + kImplAhead < n) {
    if (const c10::TensorImpl* impl = impl_if_tensor(PyList_GET_ITEM(list, i + kImplAhead))) {
      const char* p = reinterpret_cast<const char*>(impl);
      for (size_t off = 0; off < sizeof(c10::TensorImpl); off += 64) __builtin_prefetch(p + off);
    }
  }
  if (i + kStorageAhead < n) {
    if (const c10::TensorImpl* impl = impl_if_tensor(PyList_GET_ITEM(list, i + kStorageAhead))) {
      if (impl->has_storage()) __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
    }
  }
}

// The tensor in `obj` when the dispatcher would run the CPU kernel on it unchanged.
const at::Tensor* plain_cpu(PyObject* obj, bool written) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.device().is_cpu() || t.layout() != at::kStrided || t.is_inference()) return nullptr;
  // A conjugate / negative view's bytes are not its values: the dispatcher's fallbacks
  // resolve it before the kernel runs (here its raw bytes would be copied).
  if (t.is_conj() || t.is_neg()) return nullptr;
  // Autograd refuses in-place writes into leaves that require grad.
  if (written && t.requires_grad()) return nullptr;
  return &t;
}

// What check_copy_pair accepts, without raising (raising waits until every pair is
// known not to decline, so a call the registered op must take is never refused here).
bool pair_ok(const at::Tensor& d, const at::Tensor& s) {
  return d.scalar_type() == s.scalar_type() && d.sizes() == s.sizes();
}

}  // namespace

PyObject* batched_copy_cpu_fast(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "sdict_ext.batched_copy_";
  PyObject* dst_list = nullptr;
  PyObject* src_list = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &dst_list, &PyList_Type, &src_list)) {
    return nullptr;
  }
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      !(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty()) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(dst_list);
  if (PyList_GET_SIZE(src_list) != n) Py_RETURN_FALSE;  // the op names the mismatch
  const bool grad = at::GradMode::is_enabled();
  std::vector<const at::Tensor*> dsts(static_cast<size_t>(n));
  std::vector<const at::Tensor*> srcs(static_cast<size_t>(n));
  std::vector<DenseCopy> slots(static_cast<size_t>(n));
  // Each thread scans a contiguous range of pairs (the caller holds the GIL, which
  // keeps the lists and their tensors alive and unchanged; nothing here touches a
  // reference count) and reports what it found; ranges combine in index order.
  std::atomic<bool> declined{false};
  std::atomic<bool> dense_all{true};
  std::atomic<Py_ssize_t> first_bad{n};
  at::parallel_for(0, n, kScanGrainPairs, [&](int64_t begin, int64_t end) {
    bool dense = true;
    for (Py_ssize_t i = begin; i < end; ++i) {
      prefetch_ahead(dst_list, i, end);
      prefetch_ahead(src_list, i, end);
      const at::Tensor* d = plain_cpu(PyList_GET_ITEM(dst_list, i), grad);
      const at::Tensor* s = plain_cpu(PyList_GET_ITEM(src_list, i), false);
      if (d == nullptr || s == nullptr) {
        declined = true;
        return;
      }
      dsts[i] = d;
      srcs[i] = s;
      if (!pair_ok(*d, *s)) {
        Py_ssize_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        dense = false;
        continue;
      }
      if (dense && d->is_contiguous() && s->is_contiguous()) {
        slots[i] = dense_copy_of(*d, *s);
      } else {
        dense = false;
      }
    }
    if (!dense) dense_all = false;
  });
  if (declined) Py_RETURN_FALSE;
  if (first_bad < n) {
    const Py_ssize_t bad = first_bad;
    check_copy_pair(*dsts[bad], *srcs[bad], bad, op);
    TORCH_CHECK(false, op, ": pair ", bad, " was refused");  // not reached
  }
  const bool dense = dense_all;
  std::vector<DenseCopy> copies;
  DenseSpans spans;
  if (dense) {
    copies.reserve(static_cast<size_t>(n));
    spans.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) add_dense_copy(copies, spans, slots[i], i, *dsts[i], *srcs[i]);
  }
  std::vector<CopyEntry> plan;
  if (dense) {
    check_dense_overlap(spans, op);
  } else {
    plan = plan_batched_copy(dsts, srcs);
  }
  // What an in-place op does through the dispatcher: tell autograd the data changes.
  // Done before the copies, which would push the TensorImpls out of the cache again.
  at::parallel_for(0, n, kScanGrainPairs, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dsts[i]->unsafeGetTensorImpl()->bump_version();
  });
  int64_t total = 0;
  if (dense) {
    for (const DenseCopy& c : copies) total += c.nbytes;
  } else {
    for (const CopyEntry& e : plan) total += e.nbytes();
  }
  auto execute = [&] {
    if (dense) {
      execute_plan_cpu(copies);
    } else {
      execute_plan_cpu(plan);
    }
  };
  if (total < kReleaseGilBytes) {
    execute();
    Py_RETURN_TRUE;
  }
  // A big copy lets other Python threads run (a trainer while its checkpoint is staged
  // on a worker thread), as torch's ops do. The tensors are borrowed, so the lists are
  // snapshotted first: nothing another thread does to them frees a storage mid-copy.
  const THPObjectPtr keep_dsts(PyList_GetSlice(dst_list, 0, n));
  if (!keep_dsts) return nullptr;
  const THPObjectPtr keep_srcs(PyList_GetSlice(src_list, 0, n));
  if (!keep_srcs) return nullptr;
  {
    pybind11::gil_scoped_release no_gil;
    execute();
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// read_process_boxes(pid, addrs, full_shapes, starts, dsts) -> int: box i of a
// C-contiguous tensor of `full_shapes[i]` at address `addrs[i]` in process `pid`, of
// dsts[i]'s shape starting at index starts[i], read into dsts[i] (a contiguous CPU
// tensor of the remote dtype's item size) by process_vm_readv, without the GIL. Every
// box and destination is checked before anything is read; the destinations' version
// counters are bumped. Returns the bytes read.
PyObject* read_process_boxes(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  long long pid = 0;
  PyObject* addrs = nullptr;
  PyObject* fulls = nullptr;
  PyObject* starts = nullptr;
  PyObject* dsts = nullptr;
  if (!PyArg_ParseTuple(args, "LO!O!O!O!", &pid, &PyList_Type, &addrs, &PyList_Type, &fulls, &PyList_Type,
                        &starts, &PyList_Type, &dsts)) {
    return nullptr;
  }
  constexpr const char* op = "sdict_ext.read_process_boxes";
  const Py_ssize_t n = PyList_GET_SIZE(dsts);
  TORCH_CHECK(PyList_GET_SIZE(addrs) == n && PyList_GET_SIZE(fulls) == n && PyList_GET_SIZE(starts) == n,
              op, ": pass one address, full shape and start per destination");
  std::vector<RemoteBox> boxes(static_cast<size_t>(n));
  std::vector<c10::TensorImpl*> written;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(dsts, i);
    TORCH_CHECK(THPVariable_Check(obj), op, ": destination ", i, " is not a tensor");
    const at::Tensor& t = THPVariable_Unpack(obj);
    TORCH_CHECK(t.layout() == at::kStrided && t.has_storage() && t.device().is_cpu() && t.is_contiguous() &&
                    !t.is_conj() && !t.is_neg(),
                op, ": destination ", i, " must be a contiguous CPU tensor with its own bytes; stage "
                "into one and copy");
    RemoteBox& box = boxes[static_cast<size_t>(i)];
    box.addr = static_cast<std::uint64_t>(as_int(PyList_GET_ITEM(addrs, i), "address", i, op));
    const auto full = int_tuple(PyList_GET_ITEM(fulls, i), "full shape", i, op);
    const auto start = int_tuple(PyList_GET_ITEM(starts, i), "start", i, op);
    box.full.assign(full.begin(), full.end());
    box.start.assign(start.begin(), start.end());
    box.size.assign(t.sizes().begin(), t.sizes().end());
    box.itemsize = static_cast<int64_t>(t.element_size());
    box.dst = t.numel() == 0 ? nullptr : static_cast<char*>(t.data_ptr());
    TORCH_CHECK(box.addr != 0 || t.numel() == 0, op, ": box ", i, " has no source address");
    written.push_back(t.unsafeGetTensorImpl());
  }
  int64_t bytes = 0;
  {
    pybind11::gil_scoped_release no_gil;
    bytes = sdict_ext::read_process_boxes(static_cast<pid_t>(pid), boxes);
  }
  for (c10::TensorImpl* impl : written) impl->bump_version();
  return PyLong_FromLongLong(bytes);
  END_HANDLE_TH_ERRORS
}

// _read_samples(pid, addrs, nbytes, ids, seed) -> (bytes, [bool]): read_samples
// (remote_read.h) of each range [addrs[i], addrs[i] + nbytes[i]) of process `pid`, its
// position drawn from (seed, ids[i]), kSampleBytes per range, and whether each range's
// windows could be read; without the GIL.
PyObject* read_samples(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  long long pid = 0;
  PyObject* addr_list = nullptr;
  PyObject* nbyte_list = nullptr;
  PyObject* id_list = nullptr;
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "LO!O!O!K", &pid, &PyList_Type, &addr_list, &PyList_Type, &nbyte_list,
                        &PyList_Type, &id_list, &seed)) {
    return nullptr;
  }
  constexpr const char* op = "sdict_ext.read_samples";
  const Py_ssize_t n = PyList_GET_SIZE(addr_list);
  TORCH_CHECK(PyList_GET_SIZE(nbyte_list) == n && PyList_GET_SIZE(id_list) == n, op,
              ": pass one byte count and one id per address");
  std::vector<std::uint64_t> addrs(static_cast<size_t>(n));
  std::vector<int64_t> nbytes(static_cast<size_t>(n));
  std::vector<std::uint64_t> ids(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t addr = as_int(PyList_GET_ITEM(addr_list, i), "address", i, op);
    // (A negative one cannot be an address: it reads as refused.)
    addrs[static_cast<size_t>(i)] = addr < 0 ? 0 : static_cast<std::uint64_t>(addr);
    nbytes[static_cast<size_t>(i)] = as_int(PyList_GET_ITEM(nbyte_list, i), "byte count", i, op);
    ids[static_cast<size_t>(i)] = static_cast<std::uint64_t>(as_int(PyList_GET_ITEM(id_list, i), "id", i, op));
  }
  std::string out(static_cast<size_t>(n) * kSampleBytes, '\0');
  std::vector<bool> ok;
  {
    pybind11::gil_scoped_release no_gil;
    ok = sdict_ext::read_samples(static_cast<pid_t>(pid), addrs, nbytes, ids, seed, out.data());
  }
  THPObjectPtr flags(PyList_New(n));
  if (!flags) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* flag = ok[static_cast<size_t>(i)] ? Py_True : Py_False;
    Py_INCREF(flag);
    PyList_SET_ITEM(flags.get(), i, flag);
  }
  THPObjectPtr samples(PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size())));
  if (!samples) return nullptr;
  return PyTuple_Pack(2, samples.get(), flags.get());
  END_HANDLE_TH_ERRORS
}

}  // namespace python
}  // namespace sdict_ext
