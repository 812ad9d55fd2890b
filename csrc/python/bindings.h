// The Python bindings of sdict_ext._C (csrc/python/): the entry points module.cpp puts
// in the module's method table, and the argument readers they share.
//
// Why these are Python bindings and not registered ops: each works on Python objects
// themselves (lists of tensors, dtypes, tuples, DTensor attributes) and returns Python
// structures (lists of new tensors, tuples, None to decline), under the GIL, in one pass
// over lists of thousands of items. A torch op would turn every list into IValues and
// back, with a reference-count round trip per tensor, which is the cost these avoid;
// and none of them has a meaning under FakeTensor / torch.compile: the Python callers
// take their plain path (or the registered op) whenever tracing or a subclass is
// involved, so no fake kernel or opcheck applies.
#pragma once

#include <torch/csrc/python_headers.h>

#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <cstdint>

namespace sdict_ext {
namespace python {

// csrc/python/copy_fast_paths.cpp: copies that skip the dispatcher.
PyObject* batched_copy_cpu_fast(PyObject* self, PyObject* args);
PyObject* read_process_boxes(PyObject* self, PyObject* args);
PyObject* read_samples(PyObject* self, PyObject* args);

// csrc/python/planning.cpp: views and per-tensor facts for the Python planners.
PyObject* carve_views(PyObject* self, PyObject* args);
PyObject* box_views(PyObject* self, PyObject* args);
PyObject* dtensor_boxes(PyObject* self, PyObject* args);
PyObject* describe_tensors(PyObject* self, PyObject* args);
PyObject* shared_memory(PyObject* self, PyObject* args);

// Item `i`'s `what` as an int64; raises naming `op`, the item and what was expected.
inline int64_t as_int(PyObject* obj, const char* what, Py_ssize_t i, const char* op = "sdict_ext.carve_views") {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK(false, op, ": ", what, " of tensor ", i, " must be ints");
  }
  return static_cast<int64_t>(v);
}

// Item `i`'s `what` (a tuple of ints) as sizes; raises naming `op` and the item.
inline c10::SmallVector<int64_t, 6> int_tuple(PyObject* obj, const char* what, Py_ssize_t i,
                                              const char* op = "sdict_ext.carve_views") {
  TORCH_CHECK(PyTuple_Check(obj), op, ": ", what, " of tensor ", i, " must be a tuple");
  c10::SmallVector<int64_t, 6> out;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(obj); ++k) out.push_back(as_int(PyTuple_GET_ITEM(obj, k), what, i, op));
  return out;
}

}  // namespace python
}  // namespace sdict_ext
