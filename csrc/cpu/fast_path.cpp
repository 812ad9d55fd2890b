// A direct Python entry point for batched_copy_ between plain CPU tensors.
//
// Through torch.ops, a call with 20,000 pairs spends most of its time turning the two
// Python lists into IValues and back, with a reference-count round trip (and a GIL
// handshake) per tensor. Here the tensors are borrowed from their Python objects, so
// only the plan and the copies remain. It declines (returns False) whenever the
// dispatcher could do something else with the call: a tensor subclass (DTensor,
// FakeTensor), a non-CPU tensor, an active dispatch or torch-function mode, a
// destination that autograd would refuse to write in place. The Python wrapper then
// takes the registered op.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "sdict_ext/cpu.h"

#include <atomic>

namespace sdict_ext {

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

// From this many bytes the copy runs without the GIL: above ~100 us of copying,
// releasing it costs less than what other threads would wait.
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
  // Autograd refuses in-place writes into leaves that require grad.
  if (written && t.requires_grad()) return nullptr;
  return &t;
}

// What check_copy_pair accepts, without raising (raising waits until every pair is
// known not to decline, so a call the registered op must take is never refused here).
bool pair_ok(const at::Tensor& d, const at::Tensor& s) {
  return d.scalar_type() == s.scalar_type() && d.sizes() == s.sizes();
}

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
    for (Py_ssize_t i = 0; i < n; ++i) add_dense_copy(copies, spans, slots[i], i);
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

PyObject* built_with_openmp(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"batched_copy_cpu_fast", batched_copy_cpu_fast, METH_VARARGS,
     "batched_copy_ for plain CPU tensor lists; False when the registered op must run."},
    {"built_with_openmp", built_with_openmp, METH_NOARGS,
     "Whether at::parallel_for in these kernels runs on torch's OpenMP threads."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() {
  return methods;
}

}  // namespace sdict_ext
