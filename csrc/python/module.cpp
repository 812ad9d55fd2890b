// Module init of sdict_ext._C: the method table of its Python bindings
// (csrc/python/*.cpp), and the few module-level queries that go with them. Importing the
// module loads the library, whose static initialisers register the torch ops
// (csrc/ops.cpp and the backends' TORCH_LIBRARY_IMPL blocks).
//
// The queries are bindings, not registered ops: they report or set process-wide facts
// of this build (OpenMP, the CUDA routing thresholds, whether the direct read exists
// here) and touch no tensor, so there is nothing to dispatch and nothing to trace.
#include <torch/csrc/python_headers.h>

#include "bindings.h"
#include "sdict_ext/remote_read.h"
#include "sdict_ext/tuning.h"

#include <utility>

namespace sdict_ext {
namespace python {

namespace {

PyObject* built_with_openmp(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// direct_read_available() -> bool: whether this build can read another process's memory
// (process_vm_readv, Linux only); elsewhere the direct-read entry points raise.
PyObject* direct_read_available(PyObject* /*self*/, PyObject* /*args*/) {
  if (kDirectReadAvailable) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
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
    {"_read_process_boxes", read_process_boxes, METH_VARARGS,
     "Private (broadcast_state_dict's direct reads): boxes of another process's contiguous tensors into "
     "ours: (pid, addrs, full_shapes, starts, dsts) -> bytes."},
    {"_read_samples", read_samples, METH_VARARGS,
     "Private: two sample windows of each byte range of a process: (pid, addrs, nbytes, ids, seed) -> "
     "(bytes, list of bool)."},
    {"dtensor_boxes", dtensor_boxes, METH_VARARGS,
     "This rank's box of each plain-placement DTensor: (values, shapes, dtypes, classes, mesh_facts) -> list."},
    {"describe_tensors", describe_tensors, METH_VARARGS,
     "Per value (shape, dtype, address, readable in place) of plain CPU / CUDA tensors, else None."},
    {"shared_memory", shared_memory, METH_VARARGS,
     "Per tensor the first tensor that is the same view (-1: no address), and the first pair whose "
     "memory overlaps with a destination (sides 1): (tensors, sides) -> (list, pair or None)."},
    {"copy_thresholds", copy_thresholds_py, METH_VARARGS,
     "CUDA copy routing thresholds: (d2h=None, h2d=None) -> the previous (d2h, h2d) bytes."},
    {"direct_read_available", direct_read_available, METH_NOARGS,
     "Whether this build reads other processes' memory directly (process_vm_readv: Linux only)."},
    {"built_with_openmp", built_with_openmp, METH_NOARGS,
     "Whether at::parallel_for in these kernels runs on torch's OpenMP threads."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

}  // namespace python
}  // namespace sdict_ext

// `import sdict_ext._C` runs this.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, sdict_ext::python::methods};
  return PyModule_Create(&module_def);
}
