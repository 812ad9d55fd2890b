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

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "sdict_ext/cpu.h"

namespace sdict_ext {

namespace {

bool plain_cpu(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_inference();
}

bool borrow(PyObject* list, std::vector<const at::Tensor*>& out, bool written) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out.reserve(static_cast<size_t>(n));
  written = written && at::GradMode::is_enabled();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(list, i);
    if (!plain_cpu(obj)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    // Autograd refuses in-place writes into leaves that require grad.
    if (written && t.requires_grad()) return false;
    out.push_back(&t);
  }
  return true;
}

PyObject* batched_copy_cpu_fast(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* dst_list = nullptr;
  PyObject* src_list = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &dst_list, &PyList_Type, &src_list)) {
    return nullptr;
  }
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      !(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty()) {
    Py_RETURN_FALSE;
  }
  std::vector<const at::Tensor*> dsts;
  std::vector<const at::Tensor*> srcs;
  if (!borrow(dst_list, dsts, true) || !borrow(src_list, srcs, false)) {
    Py_RETURN_FALSE;
  }
  execute_plan_cpu(plan_batched_copy(dsts, srcs));
  // What an in-place op does through the dispatcher: tell autograd the data changed.
  for (const at::Tensor* d : dsts) d->unsafeGetTensorImpl()->bump_version();
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"batched_copy_cpu_fast", batched_copy_cpu_fast, METH_VARARGS,
     "batched_copy_ for plain CPU tensor lists; False when the registered op must run."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() {
  return methods;
}

}  // namespace sdict_ext
