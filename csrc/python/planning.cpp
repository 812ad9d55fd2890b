// Planning helpers: views carved out of a slab or a tensor, and the per-tensor facts
// (shapes, dtypes, addresses, DTensor boxes) that the Python planners of broadcast and
// distribute read for every key of a state dict.
//
// Why these are Python bindings and not registered ops: each works on Python objects
// themselves (lists of tensors, dtypes, tuples, DTensor attributes) and returns Python
// structures (lists of new tensors, tuples, None to decline), under the GIL, in one pass
// over lists of thousands of items. A torch op would turn every list into IValues and
// back, with a reference-count round trip per tensor, which is the cost these avoid;
// and none of them has a meaning under FakeTensor / torch.compile: the Python callers
// take their plain path (or the registered op) whenever tracing or a subclass is
// involved, so no fake kernel or opcheck applies.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include "bindings.h"
#include "sdict_ext/checked.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace sdict_ext {
namespace python {

// Tensors viewing `slab`'s storage, one per (dtype, shape, strides, element offset):
// what as_strided on a dtype view of the slab gives, without a dispatcher call and
// an autograd view per tensor (which, from Python, is most of create_cpu_state_dict
// for a state dict of thousands of tensors). Each is an independent tensor sharing the slab's storage, as
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
// call and an autograd view per dim (a narrow per dim per tensor of a state dict, each
// a dispatcher round trip from Python). A box that is the whole tensor is the tensor itself. None (nothing
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

// dtensor_boxes(values, shapes, dtypes, classes, mesh_facts) -> list: per value, this
// rank's (local tensor, box shape, box start, address of the box's first byte or 0 when
// it is empty, full shape) of a full tensor of `shapes[i]` (None: the value's own
// global shape), where the value is exactly a DTensor (classes = (DTensor, Shard,
// Replicate)) whose placements are all Shard / Replicate, which this rank is part of,
// and whose local tensor is a strided CPU tensor of that box's shape and of
// `dtypes[i]` (None: any);
// else None, and the caller plans that value itself. `mesh_facts(mesh)` -> (mesh shape,
// this rank's coordinate or None) is called once per distinct mesh. The arithmetic is
// box_of's (sdict_ext/collectives/boxes.py): each Shard(d) cuts the current extent of dim d
// as torch.chunk does, mesh dims left to right. For thousands of DTensors this is the
// per-key planning of a broadcast: one C++ pass instead of attribute reads,
// placement hashing and tuple building per key in Python.
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
// of every source tensor, read in one C++ pass instead of attribute reads per tensor in
// Python.
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


// shared_memory(tensors, sides) -> (same, clash): what reshard_state_dict must know of
// the memory of a call's local tensors, on every call (memory is not part of a layout):
// same[i] is the index of the first tensor that is the very same view as tensor i (one
// device, address, dtype, sizes and strides: tied keys), i itself when none is, or -1
// where tensor i has no addresses to compare (meta, no storage, not strided: the caller
// decides those); clash is the first pair (a, b), a < b, of tensors whose spans of
// memory overlap without being one view and of which at least one has side 1 (a
// destination), else None. A span runs from a tensor's first element to one past its
// last (strides are non-negative in torch), so two interleaved views count as
// overlapping: the conservative answer for a destination that is about to be written.
// One sort and one sweep instead of attribute reads per tensor in Python.
PyObject* shared_memory(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  PyObject* sides = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &tensors, &PyList_Type, &sides)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  TORCH_CHECK(PyList_GET_SIZE(sides) == n, "sdict_ext.shared_memory: pass one side per tensor");
  struct Span {
    uintptr_t first;
    uintptr_t end;
    Py_ssize_t index;
    int side;
  };
  std::vector<Span> spans;
  spans.reserve(static_cast<size_t>(n));
  std::vector<Py_ssize_t> same(static_cast<size_t>(n), -1);
  std::vector<const at::Tensor*> views(static_cast<size_t>(n), nullptr);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors, i);
    TORCH_CHECK(THPVariable_Check(obj), "sdict_ext.shared_memory: item ", i, " is not a tensor");
    const at::Tensor& t = THPVariable_Unpack(obj);
    const int side = static_cast<int>(as_int(PyList_GET_ITEM(sides, i), "side", i, "sdict_ext.shared_memory"));
    if (t.is_meta() || t.layout() != at::kStrided || !t.has_storage() || t.storage().data() == nullptr) continue;
    same[i] = i;
    views[i] = &t;
    if (t.numel() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent = checked_add(extent, checked_mul(t.size(d) - 1, t.stride(d)));
    const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({first, first + static_cast<uintptr_t>(checked_mul(extent, t.element_size())), i, side});
  }
  const auto one_view = [&](Py_ssize_t a, Py_ssize_t b) {
    const at::Tensor& x = *views[a];
    const at::Tensor& y = *views[b];
    return x.device() == y.device() && x.data_ptr() == y.data_ptr() && x.scalar_type() == y.scalar_type() &&
           x.sizes() == y.sizes() && x.strides() == y.strides();
  };
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.first < b.first; });
  // Ties: views of one address are neighbours after the sort.
  for (size_t k = 0; k < spans.size(); ++k) {
    for (size_t m = k; m-- > 0 && spans[m].first == spans[k].first;) {
      if (one_view(spans[m].index, spans[k].index)) {
        same[spans[k].index] = std::min(same[spans[k].index], same[spans[m].index]);
        same[spans[m].index] = same[spans[k].index];
      }
    }
  }
  // Ties between empty tensors and others are by view only (no span): compare by address.
  Py_ssize_t clash_a = -1, clash_b = -1;
  const Span* reach = nullptr;
  for (const Span& span : spans) {
    if (reach != nullptr && span.first < reach->end && same[span.index] != same[reach->index] &&
        (span.side == 1 || reach->side == 1)) {
      clash_a = std::min(span.index, reach->index);
      clash_b = std::max(span.index, reach->index);
      break;
    }
    if (reach == nullptr || span.end > reach->end) reach = &span;
  }
  THPObjectPtr out(PyList_New(n));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) PyList_SET_ITEM(out.get(), i, PyLong_FromSsize_t(same[i]));
  if (clash_a < 0) return Py_BuildValue("(OO)", out.get(), Py_None);
  return Py_BuildValue("(O(nn))", out.get(), clash_a, clash_b);
  END_HANDLE_TH_ERRORS
}

}  // namespace python
}  // namespace sdict_ext
