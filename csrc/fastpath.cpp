// The per-call fast path of batch_norm_forward and batch_norm_backward.
//
// A call on a small array is all overhead: the Python-level checks and pybind11's conversion of a
// dozen arguments cost ~6 us where the kernel on 64x3 values takes a fraction of one.  These two
// functions take the public functions' arguments as they came, accept only the plain case, and
// run it with the numpy C API.  Anything else, including every invalid argument, returns None, and
// the Python function then takes its checked path, which raises the descriptive errors.  So the
// fast path never decides whether a call is valid, only whether it is plain; what it computes is
// what the checked path computes, through the same kernels.
//
// The plain case is the conjunction of the rules below, each a rule of the argument layer
// (python/bnkernel/_checks.py, FAST_PATH_RULES, which names the Python function stating each;
// kRules here must list the same names, tests/test_fastpath.py holds them together, and its
// property tests show that the fast path never accepts a call the checked path refuses):
//   x-plain            x: exact ndarray, float16/bfloat16/float32/float64, C-contiguous, aligned,
//                      ndim >= 2, not empty (plain(), input())
//   axis               an exact int in [-ndim, ndim) (input())
//   flags              training, running_var_unbiased: exact bools
//   eps                an exact float, finite, >= 0
//   momentum           an exact float in [0, 1] (training)
//   per-channel        gamma, beta, running statistics: plain, 1-d, length C, x's parameter
//                      dtype (float32 for 16-bit data, else x's); mean and invstd: plain float64
//                      (per_channel())
//   one-value          training: more than one value per channel
//   running-required   inference: both running statistics given; training: both or neither
//   running-writeable  training: the running statistics given are writeable
//   out-plain          out: plain, x's dtype and shape, writeable (output())
//   overlap            out shares memory with no other argument; updated running statistics share
//                      none with each other, x or the parameters (overlaps(), disjoint())
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION  // runs on every NumPy the package supports
#include <numpy/arrayobject.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <new>

#include "bnkernel/kernels.hpp"
#include "fastpath.hpp"

namespace {

using bnkernel::Shape;

// The array if obj is a plain, aligned, C-contiguous, native-endian ndarray of `type`, else null.
// PyArray_ISCARRAY_RO is C_CONTIGUOUS | ALIGNED: an array not aligned to its element size is
// declined here like anything else not plain (the ordinary path, whose bindings refuse it).
PyArrayObject* plain(PyObject* obj, int type) {
  if (!PyArray_CheckExact(obj)) return nullptr;
  auto* a = reinterpret_cast<PyArrayObject*>(obj);
  if (PyArray_TYPE(a) != type || PyArray_ISBYTESWAPPED(a) || !PyArray_ISCARRAY_RO(a)) {
    return nullptr;
  }
  return a;
}

// A per-channel vector: plain, 1-d, length C (None allowed when `optional`).  `ok` turns false when
// the argument is not plain.
PyArrayObject* per_channel(PyObject* obj, int type, npy_intp channels, bool optional, bool& ok) {
  if (obj == Py_None) {
    ok = ok && optional;
    return nullptr;
  }
  PyArrayObject* a = plain(obj, type);
  if (!a || PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != channels) {
    ok = false;
    return nullptr;
  }
  return a;
}

bool writeable(PyArrayObject* a) {
  return PyArray_FLAGS(a) & NPY_ARRAY_WRITEABLE;
}

// Contiguous arrays share memory exactly when their byte ranges intersect.
bool overlaps(PyArrayObject* a, PyArrayObject* b) {
  if (!a || !b) return false;
  const auto* a0 = static_cast<const char*>(PyArray_DATA(a));
  const auto* b0 = static_cast<const char*>(PyArray_DATA(b));
  return a0 < b0 + PyArray_NBYTES(b) && b0 < a0 + PyArray_NBYTES(a);
}

// Whether a shares memory with none of `others` (null entries ignored).
bool disjoint(PyArrayObject* a, std::initializer_list<PyArrayObject*> others) {
  for (PyArrayObject* o : others) {
    if (overlaps(a, o)) return false;
  }
  return true;
}

// ml_dtypes' bfloat16 has no fixed NumPy type number: NumPy gives it one when ml_dtypes registers
// the type.  An array of a user type (one past NumPy's own) is taken for bfloat16 when its scalar
// type is the very object ml_dtypes.bfloat16, from an ml_dtypes already imported (an array of it
// cannot exist otherwise; this never imports it); its number is then remembered.  (The GIL is held
// here.)
int bfloat16_type = -1;

bool is_bfloat16(PyArrayObject* a) {
  const int type = PyArray_TYPE(a);
  if (type == bfloat16_type) return true;
  if (bfloat16_type >= 0 || type < NPY_USERDEF) return false;
  PyObject* name = PyUnicode_FromString("ml_dtypes");
  PyObject* module = name ? PyImport_GetModule(name) : nullptr;
  Py_XDECREF(name);
  if (!module) {
    PyErr_Clear();
    return false;
  }
  PyObject* scalar = PyObject_GetAttrString(module, "bfloat16");
  Py_DECREF(module);
  if (!scalar) {
    PyErr_Clear();
    return false;
  }
  const bool match = scalar == reinterpret_cast<PyObject*>(PyArray_DESCR(a)->typeobj);
  Py_DECREF(scalar);
  if (match) bfloat16_type = type;
  return match;
}

// x: plain float16/bfloat16/float32/float64, ndim >= 2, not empty; the channel axis from `axis` (a
// Python int in range); the (outer, C, inner) view.  param_type: the dtype of the per-channel
// parameters and running statistics (bnkernel::Param: float32 for 16-bit data).
struct Input {
  PyArrayObject* x = nullptr;
  int type = 0;
  int param_type = 0;
  Shape shape;
};

bool input(PyObject* obj, PyObject* axis_obj, Input& in) {
  if (!PyArray_CheckExact(obj)) return false;
  const int type = PyArray_TYPE(reinterpret_cast<PyArrayObject*>(obj));
  if (type != NPY_HALF && type != NPY_FLOAT && type != NPY_DOUBLE &&
      !is_bfloat16(reinterpret_cast<PyArrayObject*>(obj))) {
    return false;
  }
  PyArrayObject* x = plain(obj, type);
  if (!x || PyArray_NDIM(x) < 2 || PyArray_SIZE(x) == 0) return false;
  if (!PyLong_CheckExact(axis_obj)) return false;
  int overflow = 0;
  const long axis_value = PyLong_AsLongAndOverflow(axis_obj, &overflow);
  const int ndim = PyArray_NDIM(x);
  if (overflow || axis_value < -ndim || axis_value >= ndim) return false;
  const int axis = static_cast<int>(axis_value < 0 ? axis_value + ndim : axis_value);
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= PyArray_DIM(x, i);
  for (int i = axis + 1; i < ndim; ++i) inner *= PyArray_DIM(x, i);
  const bool half = type == NPY_HALF || type == bfloat16_type;
  in = Input{x, type, half ? NPY_FLOAT : type, Shape{outer, PyArray_DIM(x, axis), inner}};
  return true;
}

// out=None: a new C-ordered array like x; else `out` if it is plain, x's shape and dtype,
// writeable and clear of every input.
PyArrayObject* output(PyObject* out, const Input& in,
                      std::initializer_list<PyArrayObject*> inputs) {
  if (out == Py_None) {
    return reinterpret_cast<PyArrayObject*>(
        PyArray_SimpleNew(PyArray_NDIM(in.x), PyArray_DIMS(in.x), in.type));
  }
  PyArrayObject* a = plain(out, in.type);
  if (!a || !writeable(a) || !PyArray_SAMESHAPE(a, in.x)) return nullptr;
  for (PyArrayObject* i : inputs) {
    if (overlaps(a, i)) return nullptr;
  }
  Py_INCREF(a);
  return a;
}

bool finite_float(PyObject* obj, double& value) {
  if (!PyFloat_CheckExact(obj)) return false;
  value = PyFloat_AS_DOUBLE(obj);
  return std::isfinite(value);
}

template <typename T>
T* data(PyArrayObject* a) {
  return a ? static_cast<T*>(PyArray_DATA(a)) : nullptr;
}

// Runs f() without the GIL; a C++ exception becomes a Python one.
template <class F>
bool run_kernel(F&& f) {
  const char* failure = nullptr;
  bool no_memory = false;
  Py_BEGIN_ALLOW_THREADS;
  try {
    f();
  } catch (const std::bad_alloc&) {
    no_memory = true;
  } catch (const std::exception& e) {
    failure = e.what();
  }
  Py_END_ALLOW_THREADS;
  if (no_memory) {
    PyErr_NoMemory();
    return false;
  }
  if (failure) {
    PyErr_SetString(PyExc_RuntimeError, failure);
    return false;
  }
  return true;
}

PyObject* new_vector(npy_intp channels, int type) {
  return PyArray_SimpleNew(1, &channels, type);
}

// Steals the three references; null (with the error set) if any is null.
PyObject* triple(PyObject* a, PyObject* b, PyObject* c) {
  PyObject* t = a && b && c ? PyTuple_Pack(3, a, b, c) : nullptr;
  Py_XDECREF(a);
  Py_XDECREF(b);
  Py_XDECREF(c);
  return t;
}

PyObject* not_plain() {
  Py_RETURN_NONE;
}

// f(T{}) for the data type T of a plain array (float16, bfloat16, float32 or float64, as input()
// admits)
template <class F>
void with_type(int type, F&& f) {
  if (type == NPY_HALF) {
    f(bnkernel::float16{});
  } else if (type == bfloat16_type) {
    f(bnkernel::bfloat16{});
  } else if (type == NPY_FLOAT) {
    f(float{});
  } else {
    f(double{});
  }
}

// (result, a, b): a and b new vectors of `channels` values of `type` that fill(a's data, b's data)
// writes without the GIL; steals result.  Null (with the error set) on any failure.
template <typename V, class Fill>
PyObject* with_two_vectors(PyArrayObject* result, npy_intp channels, int type, Fill&& fill) {
  PyObject* a = new_vector(channels, type);
  PyObject* b = new_vector(channels, type);
  if (a && b) {
    auto* pa = static_cast<V*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(a)));
    auto* pb = static_cast<V*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(b)));
    if (!run_kernel([&] { fill(pa, pb); })) Py_CLEAR(a);
  }
  return triple(reinterpret_cast<PyObject*>(result), a, b);
}

// forward_fast(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis,
//              running_var_unbiased, out) -> (y, mean, invstd) or None
PyObject* forward_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 11) {
    PyErr_SetString(PyExc_TypeError, "forward_fast: expected 11 arguments");
    return nullptr;
  }
  Input in;
  if (!input(args[0], args[8], in)) return not_plain();
  const Shape s = in.shape;
  PyObject* training = args[5];
  PyObject* unbiased = args[9];
  if (!PyBool_Check(training) || !PyBool_Check(unbiased)) return not_plain();
  double eps = 0.0, momentum = 0.0;
  if (!finite_float(args[7], eps) || eps < 0.0) return not_plain();
  bool ok = true;
  PyArrayObject* gamma = per_channel(args[1], in.param_type, s.channels, true, ok);
  PyArrayObject* beta = per_channel(args[2], in.param_type, s.channels, true, ok);
  PyArrayObject* rm = per_channel(args[3], in.param_type, s.channels, true, ok);
  PyArrayObject* rv = per_channel(args[4], in.param_type, s.channels, true, ok);
  if (!ok) return not_plain();

  if (training == Py_True) {
    if ((rm == nullptr) != (rv == nullptr)) return not_plain();
    if (s.per_channel() < 2 || !finite_float(args[6], momentum)) return not_plain();
    if (momentum < 0.0 || momentum > 1.0) return not_plain();
    if ((rm && !writeable(rm)) || (rv && !writeable(rv))) return not_plain();
    if (!disjoint(rm, {rv, in.x, gamma, beta}) || !disjoint(rv, {in.x, gamma, beta})) {
      return not_plain();
    }
    PyArrayObject* y = output(args[10], in, {in.x, gamma, beta, rm, rv});
    if (!y) return PyErr_Occurred() ? nullptr : not_plain();
    return with_two_vectors<double>(y, s.channels, NPY_DOUBLE, [&](double* pm, double* pi) {
      with_type(in.type, [&](auto zero) {
        using T = decltype(zero);
        using P = bnkernel::Param<T>;
        bnkernel::forward_train(
            data<T>(in.x), s, data<P>(gamma), data<P>(beta), eps, data<T>(y), pm, pi,
            bnkernel::RunningUpdate<P>{data<P>(rm), data<P>(rv), momentum, unbiased == Py_True},
            bnkernel::Epilogue<T>{});
      });
    });
  }

  // inference: the running statistics are the statistics
  if (!rm || !rv) return not_plain();
  PyArrayObject* y = output(args[10], in, {in.x, gamma, beta, rm, rv});
  if (!y) return PyErr_Occurred() ? nullptr : not_plain();
  return with_two_vectors<double>(y, s.channels, NPY_DOUBLE, [&](double* pm, double* pi) {
    with_type(in.type, [&](auto zero) {
      using T = decltype(zero);
      using P = bnkernel::Param<T>;
      for (int64_t c = 0; c < s.channels; ++c) {
        pm[c] = static_cast<double>(data<P>(rm)[c]);
        pi[c] = 1.0 / std::sqrt(static_cast<double>(data<P>(rv)[c]) + eps);
      }
      bnkernel::normalize(data<T>(in.x), s, pm, pi, data<P>(gamma), data<P>(beta), data<T>(y),
                          bnkernel::Epilogue<T>{});
    });
  });
}

// backward_fast(dy, x, mean, invstd, gamma, training, axis, out) -> (dx, dgamma, dbeta) or None
PyObject* backward_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "backward_fast: expected 8 arguments");
    return nullptr;
  }
  Input in;
  if (!input(args[1], args[6], in)) return not_plain();
  const Shape s = in.shape;
  PyArrayObject* dy = plain(args[0], in.type);
  if (!dy || !PyArray_SAMESHAPE(dy, in.x)) return not_plain();
  PyObject* training = args[5];
  if (!PyBool_Check(training)) return not_plain();
  if (training == Py_True && s.per_channel() < 2) return not_plain();
  bool ok = true;
  PyArrayObject* mean = per_channel(args[2], NPY_DOUBLE, s.channels, false, ok);
  PyArrayObject* invstd = per_channel(args[3], NPY_DOUBLE, s.channels, false, ok);
  PyArrayObject* gamma = per_channel(args[4], in.param_type, s.channels, true, ok);
  if (!ok) return not_plain();
  PyArrayObject* dx = output(args[7], in, {in.x, dy, gamma, mean, invstd});
  if (!dx) return PyErr_Occurred() ? nullptr : not_plain();
  return with_two_vectors<char>(dx, s.channels, in.param_type, [&](char* pdg, char* pdb) {
    with_type(in.type, [&](auto zero) {
      using T = decltype(zero);
      using P = bnkernel::Param<T>;
      auto* k = training == Py_True ? &bnkernel::backward_train<T> : &bnkernel::backward_frozen<T>;
      k(data<T>(dy), data<T>(in.x), s, data<double>(mean), data<double>(invstd), data<P>(gamma),
        data<T>(dx), reinterpret_cast<P*>(pdg), reinterpret_cast<P*>(pdb), bnkernel::ReluGrad<T>{});
    });
  });
}

// The rules above, by name (bnkernel._core.fast_path_rules; see the comment at the top).
constexpr const char* kRules[] = {
    "x-plain",           "axis",        "flags",     "eps",
    "momentum",          "per-channel", "one-value", "running-required",
    "running-writeable", "out-plain",   "overlap"};

PyMethodDef methods[] = {
    {"forward_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_fast)),
     METH_FASTCALL,
     "forward_fast(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, "
     "running_var_unbiased, out) -> (y, mean, invstd), or None when the arguments are not the "
     "plain case (bnkernel.batch_norm_forward then takes its ordinary path)"},
    {"backward_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(backward_fast)),
     METH_FASTCALL,
     "backward_fast(dy, x, mean, invstd, gamma, training, axis, out) -> (dx, dgamma, dbeta), or "
     "None when the arguments are not the plain case"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

namespace bnkernel_python {

bool add_fast_paths(PyObject* module) {
  if (PyArray_ImportNumPyAPI() < 0) return false;
  PyObject* rules = PyTuple_New(static_cast<Py_ssize_t>(std::size(kRules)));
  if (!rules) return false;
  for (size_t i = 0; i < std::size(kRules); ++i) {
    PyObject* name = PyUnicode_FromString(kRules[i]);
    if (!name) {
      Py_DECREF(rules);
      return false;
    }
    PyTuple_SET_ITEM(rules, static_cast<Py_ssize_t>(i), name);
  }
  if (PyModule_AddObject(module, "fast_path_rules", rules) < 0) {
    Py_DECREF(rules);
    return false;
  }
  return PyModule_AddFunctions(module, methods) == 0;
}

}  // namespace bnkernel_python
