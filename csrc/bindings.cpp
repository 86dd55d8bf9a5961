// Python bindings: validate, release the GIL, dispatch.  Nothing else lives here.
//
// Every array argument is bound as py::array_t<T, c_style> with .noconvert(): an array of another
// dtype or layout is rejected, never silently copied (a copy of an output would drop its writes).
// The Python layer (python/bnkernel) picks the dtype, makes any copy itself, and passes arrays
// already viewed as (outer, C, inner).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "bnkernel/kernels.hpp"
#include "bnkernel/runtime/workspace.hpp"
#include "fastpath.hpp"

namespace py = pybind11;
using bnkernel::bfloat16;
using bnkernel::float16;
using bnkernel::Param;
using bnkernel::Shape;

// The 16-bit types as NumPy dtypes: float16 is NumPy's own; bfloat16 is ml_dtypes' (an optional
// package, imported here only when an argument gets this far, which a bfloat16 array can only do
// if ml_dtypes is already loaded).  Without it the descriptor is a 2-byte void dtype, which no
// float array matches.
namespace pybind11::detail {
template <>
struct npy_format_descriptor<bnkernel::float16> {
  static constexpr auto name = const_name("numpy.float16");
  static pybind11::dtype dtype() { return pybind11::dtype("float16"); }
};
template <>
struct npy_format_descriptor<bnkernel::bfloat16> {
  static constexpr auto name = const_name("ml_dtypes.bfloat16");
  static pybind11::dtype dtype() {
    static PyObject* cached = nullptr;  // a strong reference, kept for the process's life
    if (!cached) {
      PyObject* module = PyImport_ImportModule("ml_dtypes");
      if (!module) {
        PyErr_Clear();
        return pybind11::dtype("V2");
      }
      pybind11::object bf16 = reinterpret_steal<pybind11::object>(module).attr("bfloat16");
      cached = pybind11::dtype::from_args(bf16).release().ptr();
    }
    return reinterpret_borrow<pybind11::dtype>(cached);
  }
};
}  // namespace pybind11::detail

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;
template <typename T>
using opt_carray = std::optional<carray<T>>;

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

// ---- the checks ---------------------------------------------------------------------------------
//
// The bindings check what keeps the kernels inside their arrays when _core is called directly:
// every array has the shape its role implies from x's (outer, C, inner) view (so no index runs
// past an end), every output is writeable, every array is aligned to its element size (the
// kernels, like any C++, may assume it: a misaligned one could fault), and the few scalars that
// size or divide (count > 0, counts >= 0).  The argument policy (the parameters' dtypes beyond
// what the typed bindings enforce, overlapping arrays, the scalars' ranges) is the Python layer's.
// Each function lists its arrays once, with their roles, and check() applies the rules.

enum class Role {
  data,       // x's (outer, C, inner) view
  channel,    // one value per channel: 1-d, length C
  positions,  // one byte per position: (outer, inner), x's view without C
  parts,      // merge_stats: one per part, 1-d of length `outer` (the parts)
  part_rows,  // merge_stats: (parts, C)
};

struct Arg {
  const char* name;
  const py::array* array;  // null: None
  Role role;
  bool written;
};

// An array read by the kernel, or written (must be writeable); None passes every check.
Arg in(const char* name, const py::array& a, Role role) {
  return {name, &a, role, false};
}
template <typename A>
Arg in(const char* name, const std::optional<A>& a, Role role) {
  return {name, a ? &*a : nullptr, role, false};
}
Arg out(const char* name, py::array& a, Role role) {
  return {name, &a, role, true};
}
template <typename A>
Arg out(const char* name, std::optional<A>& a, Role role) {
  return {name, a ? &*a : nullptr, role, true};
}

bool has_shape(const py::array& a, std::initializer_list<int64_t> dims) {
  if (a.ndim() != static_cast<py::ssize_t>(dims.size())) return false;
  py::ssize_t axis = 0;
  for (const int64_t d : dims) {
    if (a.shape(axis++) != d) return false;
  }
  return true;
}

// "<name>: expected ..." for an array whose shape does not fit its role
std::string expected(const Arg& a, Shape s) {
  const std::string name = a.name;
  switch (a.role) {
    case Role::data:
      return name + ": expected the same (outer, C, inner) shape as x";
    case Role::channel:
      return name + ": expected a 1-d array of length C = " + std::to_string(s.channels);
    case Role::positions:
      return name + ": expected an (outer, inner) array of x's positions";
    case Role::parts:
      return name + ": expected a 1-d array of length parts = " + std::to_string(s.outer);
    case Role::part_rows:
      return name + ": expected shape (parts, C) = (" + std::to_string(s.outer) + ", " +
             std::to_string(s.channels) + ")";
  }
  return name;
}

bool fits(const py::array& a, Role role, Shape s) {
  switch (role) {
    case Role::data:
      return has_shape(a, {s.outer, s.channels, s.inner});
    case Role::channel:
      return has_shape(a, {s.channels});
    case Role::positions:
      return has_shape(a, {s.outer, s.inner});
    case Role::parts:
      return has_shape(a, {s.outer});
    case Role::part_rows:
      return has_shape(a, {s.outer, s.channels});
  }
  return false;
}

void check(Shape s, std::initializer_list<Arg> args) {
  for (const Arg& a : args) {
    if (!a.array) continue;
    require(fits(*a.array, a.role, s), expected(a, s));
    require((a.array->flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0,
            std::string(a.name) + ": not aligned to its element size");
    require(!a.written || a.array->writeable(), std::string(a.name) + ": must be writeable");
  }
}

// x's (outer, C, inner) view, which every other array is checked against
Shape view3(const py::array& x) {
  require(x.ndim() == 3, "x: expected a 3-d (outer, C, inner) array");
  return Shape{x.shape(0), x.shape(1), x.shape(2)};
}

template <typename T>
const T* data(const opt_carray<T>& a) {
  return a ? a->data() : nullptr;
}
// (writeable: checked, so mutable_data() does not throw)
template <typename T>
T* mutable_data(opt_carray<T>& a) {
  return a ? a->mutable_data() : nullptr;
}

// The kernels read dresidual's mask from y (bnkernel::ReluGrad): no dresidual without it.
template <typename T>
bnkernel::ReluGrad<T> relu_grad(const opt_carray<T>& y, opt_carray<T>& dresidual) {
  require(y || !dresidual, "dresidual: needs y (the ReLU mask)");
  return {data(y), mutable_data(dresidual)};
}

// ---- bound functions ----------------------------------------------------------------------------
//
// Each is safe without the GIL once checked: every buffer is held by the caller's references.

template <typename T>
void channel_stats(const carray<T>& x, carray<double>& mean, carray<double>& m2) {
  const Shape s = view3(x);
  check(s,
        {in("x", x, Role::data), out("mean", mean, Role::channel), out("m2", m2, Role::channel)});
  double* pm = mean.mutable_data();
  double* pm2 = m2.mutable_data();
  py::gil_scoped_release release;
  bnkernel::channel_stats(x.data(), s, pm, pm2);
}

template <typename T>
int64_t masked_channel_stats(const carray<T>& x, const carray<uint8_t>& mask, carray<double>& mean,
                             carray<double>& m2) {
  const Shape s = view3(x);
  check(s, {in("x", x, Role::data), in("mask", mask, Role::positions),
            out("mean", mean, Role::channel), out("m2", m2, Role::channel)});
  double* pm = mean.mutable_data();
  double* pm2 = m2.mutable_data();
  py::gil_scoped_release release;
  return bnkernel::masked_channel_stats(x.data(), s, mask.data(), pm, pm2);
}

int64_t merge_stats_impl(const carray<int64_t>& counts, const carray<double>& means,
                         const carray<double>& m2s, carray<double>& mean, carray<double>& m2) {
  require(counts.ndim() == 1, "counts: expected a 1-d array");
  require(means.ndim() == 2, "means: expected shape (parts, C)");
  const Shape s{counts.shape(0), means.shape(1), 1};  // (parts, C)
  check(s, {in("counts", counts, Role::parts), in("means", means, Role::part_rows),
            in("m2s", m2s, Role::part_rows), out("mean", mean, Role::channel),
            out("m2", m2, Role::channel)});
  for (int64_t p = 0; p < s.outer; ++p) require(counts.data()[p] >= 0, "counts: must be >= 0");
  int64_t count = 0;
  double* pm = mean.mutable_data();
  double* pm2 = m2.mutable_data();
  py::gil_scoped_release release;
  bnkernel::merge_stats(s.outer, s.channels, counts.data(), means.data(), m2s.data(), &count, pm,
                        pm2);
  return count;
}

// T: the running statistics' type (float or double), which the batch statistics do not fix
template <typename T>
void update_running_stats(opt_carray<T>& running_mean, opt_carray<T>& running_var, int64_t count,
                          const carray<double>& mean, const carray<double>& m2, double momentum,
                          bool unbiased) {
  require(mean.ndim() == 1, "mean: expected a 1-d array");
  const Shape s{1, mean.shape(0), 1};
  check(s, {out("running_mean", running_mean, Role::channel),
            out("running_var", running_var, Role::channel), in("mean", mean, Role::channel),
            in("m2", m2, Role::channel)});
  require(count >= 0, "count: must be >= 0");
  const bnkernel::RunningUpdate<T> running{mutable_data(running_mean), mutable_data(running_var),
                                           momentum, unbiased};
  bnkernel::update_running_stats(running, s.channels, count, mean.data(), m2.data());
}

template <typename T>
void normalize(const carray<T>& x, const carray<double>& mean, const carray<double>& invstd,
               const opt_carray<Param<T>>& gamma, const opt_carray<Param<T>>& beta, carray<T>& y,
               const opt_carray<T>& residual, bool relu) {
  const Shape s = view3(x);
  check(s, {in("x", x, Role::data), in("mean", mean, Role::channel),
            in("invstd", invstd, Role::channel), in("gamma", gamma, Role::channel),
            in("beta", beta, Role::channel), out("out", y, Role::data),
            in("residual", residual, Role::data)});
  T* py_ = y.mutable_data();
  py::gil_scoped_release release;
  bnkernel::normalize(x.data(), s, mean.data(), invstd.data(), data(gamma), data(beta), py_,
                      bnkernel::Epilogue<T>{data(residual), relu});
}

template <typename T>
void forward_train(const carray<T>& x, const opt_carray<Param<T>>& gamma,
                   const opt_carray<Param<T>>& beta, double eps, carray<T>& y, carray<double>& mean,
                   carray<double>& invstd, opt_carray<Param<T>>& running_mean,
                   opt_carray<Param<T>>& running_var, double momentum, bool unbiased,
                   const opt_carray<T>& residual, bool relu) {
  const Shape s = view3(x);
  check(s,
        {in("x", x, Role::data), in("gamma", gamma, Role::channel), in("beta", beta, Role::channel),
         out("out", y, Role::data), out("mean", mean, Role::channel),
         out("invstd", invstd, Role::channel), out("running_mean", running_mean, Role::channel),
         out("running_var", running_var, Role::channel), in("residual", residual, Role::data)});
  const bnkernel::RunningUpdate<Param<T>> running{mutable_data(running_mean),
                                                  mutable_data(running_var), momentum, unbiased};
  T* py_ = y.mutable_data();
  double* pm = mean.mutable_data();
  double* pi = invstd.mutable_data();
  py::gil_scoped_release release;
  bnkernel::forward_train(x.data(), s, data(gamma), data(beta), eps, py_, pm, pi, running,
                          bnkernel::Epilogue<T>{data(residual), relu});
}

template <typename T>
void backward_reduce(const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
                     const carray<double>& invstd, carray<double>& sum_dy,
                     carray<double>& sum_dy_xhat, const opt_carray<T>& y,
                     opt_carray<T>& dresidual) {
  const Shape s = view3(x);
  check(s, {in("dy", dy, Role::data), in("x", x, Role::data), in("mean", mean, Role::channel),
            in("invstd", invstd, Role::channel), out("sum_dy", sum_dy, Role::channel),
            out("sum_dy_xhat", sum_dy_xhat, Role::channel), in("y", y, Role::data),
            out("dresidual", dresidual, Role::data)});
  const auto relu = relu_grad(y, dresidual);
  double* p1 = sum_dy.mutable_data();
  double* p2 = sum_dy_xhat.mutable_data();
  py::gil_scoped_release release;
  bnkernel::backward_reduce(dy.data(), x.data(), s, mean.data(), invstd.data(), p1, p2, relu);
}

template <typename T>
void backward_elementwise(const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
                          const carray<double>& invstd, const opt_carray<Param<T>>& gamma,
                          const carray<double>& sum_dy, const carray<double>& sum_dy_xhat,
                          int64_t count, carray<T>& dx, const opt_carray<T>& y,
                          const std::optional<carray<uint8_t>>& mask) {
  const Shape s = view3(x);
  check(s, {in("dy", dy, Role::data), in("x", x, Role::data), in("mean", mean, Role::channel),
            in("invstd", invstd, Role::channel), in("gamma", gamma, Role::channel),
            in("sum_dy", sum_dy, Role::channel), in("sum_dy_xhat", sum_dy_xhat, Role::channel),
            out("out", dx, Role::data), in("y", y, Role::data), in("mask", mask, Role::positions)});
  require(count > 0, "count: must be > 0");
  const bnkernel::ReluGrad<T> relu{data(y), nullptr};
  const T *pdy = dy.data(), *px = x.data();
  const double *pm = mean.data(), *pi = invstd.data(), *ps = sum_dy.data(),
               *psx = sum_dy_xhat.data();
  const Param<T>* pg = data(gamma);
  T* pdx = dx.mutable_data();
  py::gil_scoped_release release;
  if (mask) {
    bnkernel::masked_backward_elementwise(pdy, px, s, mask->data(), pm, pi, pg, ps, psx, count, pdx,
                                          relu);
  } else {
    bnkernel::backward_elementwise(pdy, px, s, pm, pi, pg, ps, psx, count, pdx, relu);
  }
}

template <typename T>
void backward(bool training, const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
              const carray<double>& invstd, const opt_carray<Param<T>>& gamma, carray<T>& dx,
              carray<Param<T>>& dgamma, carray<Param<T>>& dbeta, const opt_carray<T>& y,
              opt_carray<T>& dresidual) {
  const Shape s = view3(x);
  check(s, {in("dy", dy, Role::data), in("x", x, Role::data), in("mean", mean, Role::channel),
            in("invstd", invstd, Role::channel), in("gamma", gamma, Role::channel),
            out("out", dx, Role::data), out("dgamma", dgamma, Role::channel),
            out("dbeta", dbeta, Role::channel), in("y", y, Role::data),
            out("dresidual", dresidual, Role::data)});
  const auto relu = relu_grad(y, dresidual);
  const auto kernel = training ? &bnkernel::backward_train<T> : &bnkernel::backward_frozen<T>;
  T* pdx = dx.mutable_data();
  Param<T>* pdg = dgamma.mutable_data();
  Param<T>* pdb = dbeta.mutable_data();
  py::gil_scoped_release release;
  kernel(dy.data(), x.data(), s, mean.data(), invstd.data(), data(gamma), pdx, pdg, pdb, relu);
}

template <typename T>
double memory_pass(const std::string& kind, const carray<T>& src, carray<T>& dst) {
  bnkernel::MemoryPass pass;
  if (kind == "copy") {
    pass = bnkernel::MemoryPass::copy;
  } else if (kind == "read") {
    pass = bnkernel::MemoryPass::read;
  } else if (kind == "write") {
    pass = bnkernel::MemoryPass::write;
  } else {
    throw py::value_error("kind: expected 'copy', 'read' or 'write', got '" + kind + "'");
  }
  require(dst.size() == src.size(), "dst: expected as many values as src");
  const auto* lo = reinterpret_cast<const char*>(src.data());
  const auto* dlo = reinterpret_cast<const char*>(dst.data());
  const auto bytes = static_cast<py::ssize_t>(src.nbytes());
  require(dlo + bytes <= lo || lo + bytes <= dlo || bytes == 0,
          "dst: must not share memory with src");
  require(pass == bnkernel::MemoryPass::read || dst.writeable(), "dst: must be writeable");
  const T* ps = src.data();
  T* pd = pass == bnkernel::MemoryPass::read ? nullptr : dst.mutable_data();
  py::gil_scoped_release release;
  return bnkernel::memory_pass(pass, ps, pd, static_cast<int64_t>(src.size()));
}

void set_num_threads(int n) {
  // more would crash libgomp (see csrc/bnkernel/runtime/threads.cpp); n <= 0 is the default
  require(n <= bnkernel::kMaxThreads, "n: " + std::to_string(n) + " is more than the maximum of " +
                                          std::to_string(bnkernel::kMaxThreads) + " threads");
  bnkernel::set_num_threads(n);
}

template <typename T>
void register_dtype(py::module_& m) {
  m.def("channel_stats", &channel_stats<T>, py::arg("x").noconvert(), py::arg("mean").noconvert(),
        py::arg("m2").noconvert());
  m.def("masked_channel_stats", &masked_channel_stats<T>, py::arg("x").noconvert(),
        py::arg("mask").noconvert(), py::arg("mean").noconvert(), py::arg("m2").noconvert());
  m.def("normalize", &normalize<T>, py::arg("x").noconvert(), py::arg("mean").noconvert(),
        py::arg("invstd").noconvert(), py::arg("gamma").noconvert().none(true),
        py::arg("beta").noconvert().none(true), py::arg("out").noconvert(),
        py::arg("residual").noconvert().none(true) = py::none(), py::arg("relu") = false);
  m.def("forward_train", &forward_train<T>, py::arg("x").noconvert(),
        py::arg("gamma").noconvert().none(true), py::arg("beta").noconvert().none(true),
        py::arg("eps"), py::arg("out").noconvert(), py::arg("mean").noconvert(),
        py::arg("invstd").noconvert(), py::arg("running_mean").noconvert().none(true),
        py::arg("running_var").noconvert().none(true), py::arg("momentum"), py::arg("unbiased"),
        py::arg("residual").noconvert().none(true) = py::none(), py::arg("relu") = false);
  m.def("backward_reduce", &backward_reduce<T>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("mean").noconvert(), py::arg("invstd").noconvert(), py::arg("sum_dy").noconvert(),
        py::arg("sum_dy_xhat").noconvert(), py::arg("y").noconvert().none(true) = py::none(),
        py::arg("dresidual").noconvert().none(true) = py::none());
  m.def("backward_elementwise", &backward_elementwise<T>, py::arg("dy").noconvert(),
        py::arg("x").noconvert(), py::arg("mean").noconvert(), py::arg("invstd").noconvert(),
        py::arg("gamma").noconvert().none(true), py::arg("sum_dy").noconvert(),
        py::arg("sum_dy_xhat").noconvert(), py::arg("count"), py::arg("out").noconvert(),
        py::arg("y").noconvert().none(true) = py::none(),
        py::arg("mask").noconvert().none(true) = py::none());
  m.def("memory_pass", &memory_pass<T>, py::arg("kind"), py::arg("src").noconvert(),
        py::arg("dst").noconvert());
  m.def("backward", &backward<T>, py::arg("training"), py::arg("dy").noconvert(),
        py::arg("x").noconvert(), py::arg("mean").noconvert(), py::arg("invstd").noconvert(),
        py::arg("gamma").noconvert().none(true), py::arg("out").noconvert(),
        py::arg("dgamma").noconvert(), py::arg("dbeta").noconvert(),
        py::arg("y").noconvert().none(true) = py::none(),
        py::arg("dresidual").noconvert().none(true) = py::none());
}

template <typename T>
void register_running_update(py::module_& m) {
  m.def("update_running_stats", &update_running_stats<T>,
        py::arg("running_mean").noconvert().none(true),
        py::arg("running_var").noconvert().none(true), py::arg("count"),
        py::arg("mean").noconvert(), py::arg("m2").noconvert(), py::arg("momentum"),
        py::arg("unbiased"));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "bnkernel's compiled kernels. Use the bnkernel package, not this module directly.";
#define BNKERNEL_REGISTER(module, T) register_dtype<T>(module);
  BNKERNEL_FOR_EACH_DTYPE(BNKERNEL_REGISTER, m)
#undef BNKERNEL_REGISTER
  m.def("merge_stats", &merge_stats_impl, py::arg("counts").noconvert(),
        py::arg("means").noconvert(), py::arg("m2s").noconvert(), py::arg("mean").noconvert(),
        py::arg("m2").noconvert());
  // overloads by the running statistics' type (None, None: the first, a no-op)
  register_running_update<float>(m);
  register_running_update<double>(m);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &bnkernel::get_num_threads);
  m.def("workspace_allocations", &bnkernel::workspace_allocations);
  if (!bnkernel_python::add_fast_paths(m.ptr())) throw py::error_already_set();
  m.attr("have_openmp") = bnkernel::have_openmp();
  m.attr("max_threads") = bnkernel::kMaxThreads;
  m.attr("isa") = bnkernel::isa_name();
  m.attr("version") = BNKERNEL_VERSION;
  m.attr("native_build") = static_cast<bool>(BNKERNEL_NATIVE_BUILD);
  m.attr("sanitized") = static_cast<bool>(BNKERNEL_SANITIZED);
}
