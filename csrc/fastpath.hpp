// The per-call fast path of the public forward and backward (see fastpath.cpp).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace bnkernel_python {

// Adds forward_fast and backward_fast to the module; false with a Python error set on failure.
bool add_fast_paths(PyObject* module);

}  // namespace bnkernel_python
