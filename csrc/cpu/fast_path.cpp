// A direct Python entry point for batched_copy_ between plain CPU tensors.
//
// Through torch.ops, a call with 20,000 pairs spends most of its time turning the two
// Python lists into IValues and back, with a reference-count round trip (and a GIL
// handshake) per tensor. Here the tensors are borrowed from their Python objects, so
// only the plan and the copies remain. It declines (returns False) whenever the
// dispatcher could do something else with the call: a tensor subclass (DTensor,
// FakeTensor), a conjugate or negative view, a non-CPU tensor, an active dispatch or
// torch-function mode, a destination that autograd would refuse to write in place.
// The Python wrapper then takes the registered op.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "sdict_ext/cpu.h"
#include "sdict_ext/remote_read.h"
#include "sdict_ext/tuning.h"

#include <atomic>
#include <utility>

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

int64_t as_int(PyObject* obj, const char* what, Py_ssize_t i, const char* op = "sdict_ext.carve_views") {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK(false, op, ": ", what, " of tensor ", i, " must be ints");
  }
  return static_cast<int64_t>(v);
}

c10::SmallVector<int64_t, 6> int_tuple(PyObject* obj, const char* what, Py_ssize_t i,
                                       const char* op = "sdict_ext.carve_views") {
  TORCH_CHECK(PyTuple_Check(obj), op, ": ", what, " of tensor ", i, " must be a tuple");
  c10::SmallVector<int64_t, 6> out;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(obj); ++k) out.push_back(as_int(PyTuple_GET_ITEM(obj, k), what, i, op));
  return out;
}

// Tensors viewing `slab`'s storage, one per (dtype, shape, strides, element offset):
// what as_strided on a dtype view of the slab gives, without a dispatcher call and
// an autograd view per tensor (~5 us each from Python, most of create_cpu_state_dict
// for 20,000 tensors). Each is an independent tensor sharing the slab's storage, as
// PyTorch's own create_cpu_state_dict makes independent tensors; the storage, and so
// the slab, lives until the last of them dies. Like torch.empty, the tensors are
// inference tensors when made under inference mode (the TensorImpl follows the mode).
PyObject* carve_views(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* slab_obj = nullptr;
  PyObject* dtypes = nullptr;
  PyObject* shapes = nullptr;
  PyObject* strides = nullptr;
  PyObject* offsets = nullptr;
  if (!PyArg_ParseTuple(args, "OO!O!O!O!", &slab_obj, &PyList_Type, &dtypes, &PyList_Type, &shapes,
                        &PyList_Type, &strides, &PyList_Type, &offsets)) {
    return nullptr;
  }
  TORCH_CHECK(THPVariable_CheckExact(slab_obj), "sdict_ext.carve_views: the slab must be a plain tensor");
  const at::Tensor& slab = THPVariable_Unpack(slab_obj);
  TORCH_CHECK(
      slab.device().is_cpu() && slab.layout() == at::kStrided && slab.has_storage(),
      "sdict_ext.carve_views: the slab must be a strided CPU tensor with storage");
  const Py_ssize_t n = PyList_GET_SIZE(dtypes);
  TORCH_CHECK(
      PyList_GET_SIZE(shapes) == n && PyList_GET_SIZE(strides) == n && PyList_GET_SIZE(offsets) == n,
      "sdict_ext.carve_views: dtypes, shapes, strides and offsets must have one entry per tensor");
  const c10::Storage& storage = slab.storage();
  const auto capacity = static_cast<int64_t>(storage.nbytes());
  // Everything is checked before any tensor is made, so a bad spec leaves nothing behind.
  std::vector<at::ScalarType> types(static_cast<size_t>(n));
  std::vector<c10::SmallVector<int64_t, 6>> sizes(static_cast<size_t>(n));
  std::vector<c10::SmallVector<int64_t, 6>> steps(static_cast<size_t>(n));
  std::vector<int64_t> starts(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* dtype = PyList_GET_ITEM(dtypes, i);
    TORCH_CHECK(THPDtype_Check(dtype), "sdict_ext.carve_views: dtype of tensor ", i, " is not a torch.dtype");
    types[i] = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
    sizes[i] = int_tuple(PyList_GET_ITEM(shapes, i), "shape", i);
    steps[i] = int_tuple(PyList_GET_ITEM(strides, i), "strides", i);
    starts[i] = as_int(PyList_GET_ITEM(offsets, i), "offset", i);
    TORCH_CHECK(sizes[i].size() == steps[i].size(), "sdict_ext.carve_views: tensor ", i,
                " has ", sizes[i].size(), " sizes but ", steps[i].size(), " strides");
    const auto itemsize = static_cast<int64_t>(c10::elementSize(types[i]));
    TORCH_CHECK(starts[i] >= 0, "sdict_ext.carve_views: tensor ", i, " has a negative offset ", starts[i]);
    int64_t last = starts[i];  // the last element's index, when there are elements (-1: overflow)
    bool empty = false;
    for (size_t d = 0; d < sizes[i].size(); ++d) {
      TORCH_CHECK(sizes[i][d] >= 0 && steps[i][d] >= 0, "sdict_ext.carve_views: tensor ", i,
                  " has a negative size or stride");
      if (sizes[i][d] == 0) empty = true;
    }
    for (size_t d = 0; d < sizes[i].size() && !empty && last >= 0; ++d) {
      last = checked_add(last, checked_mul(sizes[i][d] - 1, steps[i][d]));
    }
    const int64_t end = last < 0 ? -1 : checked_mul(checked_add(last, 1), itemsize);
    TORCH_CHECK(
        empty || (end >= 0 && end <= capacity), "sdict_ext.carve_views: tensor ", i,
        " reaches past the slab's ", capacity, " bytes");
  }
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    auto impl = c10::make_intrusive<c10::TensorImpl>(
        c10::Storage(storage), slab.key_set(), c10::scalarTypeToTypeMeta(types[i]));
    impl->set_sizes_and_strides(sizes[i], steps[i], starts[i]);
    PyObject* wrapped = THPVariable_Wrap(at::Tensor(std::move(impl)));
    if (wrapped == nullptr) return nullptr;
    PyList_SET_ITEM(out.get(), i, wrapped);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// box_views(tensors, starts, shapes) -> list | None: tensor i's box of `shapes[i]`
// elements starting at index `starts[i]` (one entry per dim), as an independent
// tensor sharing its storage: what chained narrow() calls give, without a dispatcher
// call and an autograd view per dim (~2 us per narrow from Python, per tensor of a
// state dict). A box that is the whole tensor is the tensor itself. None (nothing
// made) when a tensor is not a plain strided tensor with storage, or is a conjugate
// / negative view, so the caller narrows those itself; a box outside its tensor raises.
PyObject* box_views(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  PyObject* starts = nullptr;
  PyObject* shapes = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &tensors, &PyList_Type, &starts, &PyList_Type,
                        &shapes)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  TORCH_CHECK(PyList_GET_SIZE(starts) == n && PyList_GET_SIZE(shapes) == n,
              "sdict_ext.box_views: pass one start and one shape per tensor");
  std::vector<int64_t> offsets(static_cast<size_t>(n));
  std::vector<c10::SmallVector<int64_t, 6>> sizes(static_cast<size_t>(n));
  std::vector<bool> whole(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_CheckExact(obj)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.layout() != at::kStrided || !t.has_storage() || t.is_conj() || t.is_neg()) Py_RETURN_NONE;
    const auto start = int_tuple(PyList_GET_ITEM(starts, i), "start", i, "sdict_ext.box_views");
    sizes[i] = int_tuple(PyList_GET_ITEM(shapes, i), "shape", i, "sdict_ext.box_views");
    const auto dims = static_cast<size_t>(t.dim());
    TORCH_CHECK(start.size() == dims && sizes[i].size() == dims, "sdict_ext.box_views: the box of tensor ", i,
                " has ", start.size(), " starts and ", sizes[i].size(), " sizes for a ", dims, "-dim tensor");
    int64_t offset = t.storage_offset();
    bool same = true;
    for (size_t d = 0; d < dims; ++d) {
      TORCH_CHECK(range_fits(start[d], sizes[i][d], t.size(d)),
                  "sdict_ext.box_views: the box of tensor ", i, " (start ", start[d], ", size ", sizes[i][d],
                  ") leaves dim ", d, " of size ", t.size(d));
      same = same && sizes[i][d] == t.size(d);
    }
    // Where narrow() puts the box: start * stride further on in each dim. Inside a tensor
    // with elements that stays in its storage; checked all the same, for an empty tensor's
    // strides and any stride torch may let through.
    for (size_t d = 0; d < dims && offset >= 0; ++d) {
      offset = checked_add(offset, checked_mul(start[d], t.stride(d)));
    }
    TORCH_CHECK(offset >= 0, "sdict_ext.box_views: the box of tensor ", i,
                " starts outside its storage (strides ", t.strides(), "); narrow the tensor instead");
    offsets[i] = offset;
    whole[i] = same;
  }
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors, i);
    if (whole[i]) {
      Py_INCREF(obj);
      PyList_SET_ITEM(out.get(), i, obj);
      continue;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
    impl->set_sizes_and_strides(sizes[i], t.strides(), offsets[i]);
    PyObject* wrapped = THPVariable_Wrap(at::Tensor(std::move(impl)));
    if (wrapped == nullptr) return nullptr;
    PyList_SET_ITEM(out.get(), i, wrapped);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// read_process_boxes(pid, addrs, full_shapes, starts, dsts) -> int: box i of a
// C-contiguous tensor of `full_shapes[i]` at address `addrs[i]` in process `pid`, of
// dsts[i]'s shape starting at index starts[i], read into dsts[i] (a contiguous CPU
// tensor of the remote dtype's item size) by process_vm_readv, without the GIL. Every
// box and destination is checked before anything is read; the destinations' version
// counters are bumped. Returns the bytes read.
PyObject* read_process_boxes_py(PyObject* /*self*/, PyObject* args) {
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
    bytes = read_process_boxes(static_cast<pid_t>(pid), boxes);
  }
  for (c10::TensorImpl* impl : written) impl->bump_version();
  return PyLong_FromLongLong(bytes);
  END_HANDLE_TH_ERRORS
}

// _read_samples(pid, addrs, nbytes, ids, seed) -> (bytes, [bool]): read_samples
// (remote_read.h) of each range [addrs[i], addrs[i] + nbytes[i]) of process `pid`, its
// position drawn from (seed, ids[i]), kSampleBytes per range, and whether each range's
// windows could be read; without the GIL.
PyObject* read_samples_py(PyObject* /*self*/, PyObject* args) {
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
    ok = read_samples(static_cast<pid_t>(pid), addrs, nbytes, ids, seed, out.data());
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

// dtensor_boxes(values, shapes, dtypes, classes, mesh_facts) -> list: per value, this
// rank's (local tensor, box shape, box start, address of the box's first byte or 0 when
// it is empty, full shape) of a full tensor of `shapes[i]` (None: the value's own
// global shape), where the value is exactly a DTensor (classes = (DTensor, Shard,
// Replicate)) whose placements are all Shard / Replicate, which this rank is part of,
// and whose local tensor is a strided CPU tensor of that box's shape and of
// `dtypes[i]` (None: any);
// else None, and the caller plans that value itself. `mesh_facts(mesh)` -> (mesh shape,
// this rank's coordinate or None) is called once per distinct mesh. The arithmetic is
// box_of's (sdict_ext/_collectives.py): each Shard(d) cuts the current extent of dim d
// as torch.chunk does, mesh dims left to right. For thousands of DTensors this is the
// per-key planning of a broadcast: ~1 us each instead of ~3 us of attribute reads,
// placement hashing and tuple building in Python.
PyObject* dtensor_boxes(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* values = nullptr;
  PyObject* shapes = nullptr;
  PyObject* dtypes = nullptr;
  PyObject* classes = nullptr;
  PyObject* facts_fn = nullptr;
  if (!PyArg_ParseTuple(args, "O!OOO!O", &PyList_Type, &values, &shapes, &dtypes, &PyTuple_Type, &classes,
                        &facts_fn)) {
    return nullptr;
  }
  constexpr const char* op = "sdict_ext.dtensor_boxes";
  const Py_ssize_t n = PyList_GET_SIZE(values);
  TORCH_CHECK(PyTuple_GET_SIZE(classes) == 3, op, ": classes must be (DTensor, Shard, Replicate)");
  TORCH_CHECK(shapes == Py_None || (PyList_Check(shapes) && PyList_GET_SIZE(shapes) == n), op,
              ": shapes must be None or one tuple per value");
  TORCH_CHECK(dtypes == Py_None || (PyList_Check(dtypes) && PyList_GET_SIZE(dtypes) == n), op,
              ": dtypes must be None or one dtype per value");
  PyObject* dtensor_cls = PyTuple_GET_ITEM(classes, 0);
  PyObject* shard_cls = PyTuple_GET_ITEM(classes, 1);
  PyObject* replicate_cls = PyTuple_GET_ITEM(classes, 2);
  static PyObject* s_local = PyUnicode_InternFromString("_local_tensor");
  static PyObject* s_spec = PyUnicode_InternFromString("_spec");
  static PyObject* s_mesh = PyUnicode_InternFromString("mesh");
  static PyObject* s_placements = PyUnicode_InternFromString("placements");
  static PyObject* s_dim = PyUnicode_InternFromString("dim");
  struct Mesh {
    PyObject* mesh;  // borrowed: the DTensors hold their meshes for the call
    std::vector<int64_t> shape;
    std::vector<int64_t> coord;  // empty: this rank is not in the mesh
  };
  std::vector<Mesh> meshes;
  auto int_seq = [&](PyObject* obj, std::vector<int64_t>& out) {
    THPObjectPtr seq(PySequence_Fast(obj, "sdict_ext.dtensor_boxes: mesh_facts must give sequences"));
    if (!seq) throw python_error();
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq.get()); ++k) {
      out.push_back(as_int(PySequence_Fast_GET_ITEM(seq.get(), k), "mesh fact", k, op));
    }
  };
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  c10::SmallVector<int64_t, 6> box;
  c10::SmallVector<int64_t, 6> start;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_INCREF(Py_None);
    PyList_SET_ITEM(out.get(), i, Py_None);
    PyObject* value = PyList_GET_ITEM(values, i);
    if (reinterpret_cast<PyObject*>(Py_TYPE(value)) != dtensor_cls) continue;
    THPObjectPtr local(PyObject_GetAttr(value, s_local));
    if (!local) throw python_error();
    if (!THPVariable_CheckExact(local.get())) continue;
    const at::Tensor& lt = THPVariable_Unpack(local.get());
    if (lt.layout() != at::kStrided || !lt.device().is_cpu()) continue;
    if (dtypes != Py_None) {
      PyObject* dtype = PyList_GET_ITEM(dtypes, i);
      TORCH_CHECK(THPDtype_Check(dtype), op, ": dtype ", i, " is not a torch.dtype");
      if (reinterpret_cast<THPDtype*>(dtype)->scalar_type != lt.scalar_type()) continue;
    }
    if (shapes != Py_None) {
      box = int_tuple(PyList_GET_ITEM(shapes, i), "shape", i, op);
    } else {
      const auto sizes = THPVariable_Unpack(value).sizes();
      box.assign(sizes.begin(), sizes.end());
    }
    start.assign(box.size(), 0);
    THPObjectPtr spec(PyObject_GetAttr(value, s_spec));
    if (!spec) throw python_error();
    THPObjectPtr mesh(PyObject_GetAttr(spec.get(), s_mesh));
    THPObjectPtr placements(mesh ? PyObject_GetAttr(spec.get(), s_placements) : nullptr);
    if (!placements) throw python_error();
    Mesh* facts = nullptr;
    for (Mesh& m : meshes) {
      if (m.mesh == mesh.get()) facts = &m;
    }
    if (facts == nullptr) {
      THPObjectPtr got(PyObject_CallOneArg(facts_fn, mesh.get()));
      if (!got) throw python_error();
      TORCH_CHECK(PyTuple_Check(got.get()) && PyTuple_GET_SIZE(got.get()) == 2, op,
                  ": mesh_facts must return (shape, coordinate or None)");
      Mesh m{mesh.get(), {}, {}};
      int_seq(PyTuple_GET_ITEM(got.get(), 0), m.shape);
      if (PyTuple_GET_ITEM(got.get(), 1) != Py_None) int_seq(PyTuple_GET_ITEM(got.get(), 1), m.coord);
      meshes.push_back(std::move(m));
      facts = &meshes.back();
    }
    if (facts->coord.empty()) continue;  // this rank holds nothing of it
    THPObjectPtr seq(PySequence_Fast(placements.get(), "sdict_ext.dtensor_boxes: placements must be a sequence"));
    if (!seq) throw python_error();
    const Py_ssize_t n_placements = PySequence_Fast_GET_SIZE(seq.get());
    bool plain = n_placements <= static_cast<Py_ssize_t>(facts->shape.size()) &&
        facts->coord.size() == facts->shape.size();
    const auto dims = static_cast<int64_t>(box.size());
    for (Py_ssize_t md = 0; plain && md < n_placements; ++md) {
      PyObject* p = PySequence_Fast_GET_ITEM(seq.get(), md);
      if (reinterpret_cast<PyObject*>(Py_TYPE(p)) == shard_cls) {
        THPObjectPtr dim_obj(PyObject_GetAttr(p, s_dim));
        if (!dim_obj) throw python_error();
        int64_t d = as_int(dim_obj.get(), "Shard dim", i, op);
        if (d < 0) d += dims;
        if (d < 0 || d >= dims) {
          plain = false;
          break;
        }
        const int64_t size = box[d];
        const int64_t k = facts->shape[md];
        const int64_t r = facts->coord[md];
        // (An announced shape comes from a peer: a negative size is left to the caller.)
        if (size < 0 || k < 1 || r < 0) {
          plain = false;
          break;
        }
        // torch.chunk's ceil(size / k) and min(r * chunk, size), neither able to wrap.
        const int64_t chunk = size / k + (size % k != 0 ? 1 : 0);
        const int64_t past = checked_mul(chunk, r);
        const int64_t lo = past < 0 ? size : std::min(past, size);
        start[d] += lo;
        box[d] = std::min(size - lo, chunk);
        continue;
      }
      const int replicated = PyObject_IsInstance(p, replicate_cls);
      if (replicated < 0) throw python_error();
      plain = replicated == 1;
    }
    if (!plain || lt.sizes() != c10::IntArrayRef(box)) continue;
    const std::uintptr_t addr = lt.numel() == 0 ? 0 : reinterpret_cast<std::uintptr_t>(lt.data_ptr());
    THPObjectPtr shape_tuple(PyTuple_New(dims));
    THPObjectPtr start_tuple(PyTuple_New(dims));
    THPObjectPtr full_tuple;
    if (shapes != Py_None) {
      full_tuple = THPObjectPtr(Py_NewRef(PyList_GET_ITEM(shapes, i)));
    } else {
      full_tuple = THPObjectPtr(PyTuple_New(dims));
      if (full_tuple) {
        const auto sizes = THPVariable_Unpack(value).sizes();
        for (int64_t d = 0; d < dims; ++d) PyTuple_SET_ITEM(full_tuple.get(), d, PyLong_FromLongLong(sizes[d]));
      }
    }
    if (!shape_tuple || !start_tuple || !full_tuple) return nullptr;
    for (int64_t d = 0; d < dims; ++d) {
      PyTuple_SET_ITEM(shape_tuple.get(), d, PyLong_FromLongLong(box[d]));
      PyTuple_SET_ITEM(start_tuple.get(), d, PyLong_FromLongLong(start[d]));
    }
    PyObject* hit = PyTuple_Pack(5, local.get(), shape_tuple.get(), start_tuple.get(),
                                 THPObjectPtr(PyLong_FromUnsignedLongLong(addr)).get(), full_tuple.get());
    if (hit == nullptr) return nullptr;
    Py_DECREF(Py_None);
    PyList_SET_ITEM(out.get(), i, hit);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// describe_tensors(values) -> list: per value, (shape, dtype, address of its first
// element or 0 when it is empty, whether another process may read its bytes in place:
// a contiguous CPU tensor that is no conjugate / negative view) where the value is
// exactly a torch.Tensor of at least one dim on the CPU or a CUDA device, dense and not
// quantized; else None, and the caller describes (or rejects, naming its key) that value
// itself: a nested tensor has no sizes() to read. What broadcast_state_dict's metadata needs
// of every source tensor, ~0.2 us each instead of ~2 us of attribute reads in Python.
PyObject* describe_tensors(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* values = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &values)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(values);
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* value = PyList_GET_ITEM(values, i);
    PyObject* item = Py_None;
    if (THPVariable_CheckExact(value)) {
      const at::Tensor& t = THPVariable_Unpack(value);
      const auto device = t.device();
      if (t.dim() > 0 && t.layout() == at::kStrided && !t.is_nested() && !t.is_quantized() && t.has_storage() &&
          (device.is_cpu() || device.is_cuda())) {
        const auto sizes = t.sizes();
        THPObjectPtr shape(PyTuple_New(t.dim()));
        if (!shape) return nullptr;
        for (int64_t d = 0; d < t.dim(); ++d) PyTuple_SET_ITEM(shape.get(), d, PyLong_FromLongLong(sizes[d]));
        const std::uintptr_t addr = t.numel() == 0 ? 0 : reinterpret_cast<std::uintptr_t>(t.data_ptr());
        const bool readable = device.is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
        item = Py_BuildValue("(OOKO)", shape.get(), reinterpret_cast<PyObject*>(torch::getTHPDtype(t.scalar_type())),
                             static_cast<unsigned long long>(addr), readable ? Py_True : Py_False);
        if (item == nullptr) return nullptr;
      } else {
        Py_INCREF(item);
      }
    } else {
      Py_INCREF(item);
    }
    PyList_SET_ITEM(out.get(), i, item);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

PyObject* built_with_openmp(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// copy_thresholds(d2h=None, h2d=None) -> (d2h, h2d): the CUDA routing thresholds in
// force before the call (sdict_ext/tuning.h); a value given (bytes, >= 0) replaces one.
PyObject* copy_thresholds_py(PyObject* /*self*/, PyObject* args) {
  PyObject* d2h = Py_None;
  PyObject* h2d = Py_None;
  if (!PyArg_ParseTuple(args, "|OO", &d2h, &h2d)) return nullptr;
  CopyThresholds next = copy_thresholds();
  for (auto [arg, field] : {std::pair{d2h, &next.mapped_d2h_max_bytes}, std::pair{h2d, &next.mapped_h2d_max_bytes}}) {
    if (arg == Py_None) continue;
    const long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) return nullptr;
    if (v < 0) {
      PyErr_SetString(PyExc_ValueError, "copy_thresholds: a threshold is a byte count >= 0");
      return nullptr;
    }
    *field = static_cast<int64_t>(v);
  }
  const CopyThresholds old = set_copy_thresholds(next);
  return Py_BuildValue("(LL)", static_cast<long long>(old.mapped_d2h_max_bytes),
                       static_cast<long long>(old.mapped_h2d_max_bytes));
}

PyMethodDef methods[] = {
    {"batched_copy_cpu_fast", batched_copy_cpu_fast, METH_VARARGS,
     "batched_copy_ for plain CPU tensor lists; False when the registered op must run."},
    {"carve_views", carve_views, METH_VARARGS,
     "Tensors viewing a slab's storage: (slab, dtypes, shapes, strides, element offsets)."},
    {"box_views", box_views, METH_VARARGS,
     "Box views sharing each tensor's storage: (tensors, starts, shapes); None: narrow them yourself."},
    {"_read_process_boxes", read_process_boxes_py, METH_VARARGS,
     "Private (broadcast_state_dict's direct reads): boxes of another process's contiguous tensors into "
     "ours: (pid, addrs, full_shapes, starts, dsts) -> bytes."},
    {"_read_samples", read_samples_py, METH_VARARGS,
     "Private: two sample windows of each byte range of a process: (pid, addrs, nbytes, ids, seed) -> "
     "(bytes, list of bool)."},
    {"dtensor_boxes", dtensor_boxes, METH_VARARGS,
     "This rank's box of each plain-placement DTensor: (values, shapes, dtypes, classes, mesh_facts) -> list."},
    {"describe_tensors", describe_tensors, METH_VARARGS,
     "Per value (shape, dtype, address, readable in place) of plain CPU / CUDA tensors, else None."},
    {"copy_thresholds", copy_thresholds_py, METH_VARARGS,
     "CUDA copy routing thresholds: (d2h=None, h2d=None) -> the previous (d2h, h2d) bytes."},
    {"built_with_openmp", built_with_openmp, METH_NOARGS,
     "Whether at::parallel_for in these kernels runs on torch's OpenMP threads."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() {
  return methods;
}

}  // namespace sdict_ext
