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
#include <optional>
#include <string>

#include "bnkernel/kernels.hpp"
#include "bnkernel/workspace.hpp"
#include "fastpath.hpp"

namespace py = pybind11;
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

template <typename T>
Shape view3(const carray<T>& x, const char* name) {
  require(x.ndim() == 3, std::string(name) + ": expected a 3-d (outer, C, inner) array");
  return Shape{x.shape(0), x.shape(1), x.shape(2)};
}

template <typename T>
void same_shape(const carray<T>& a, Shape s, const char* name) {
  require(
      a.ndim() == 3 && a.shape(0) == s.outer && a.shape(1) == s.channels && a.shape(2) == s.inner,
      std::string(name) + ": expected the same (outer, C, inner) shape as x");
}

template <typename T>
void per_channel(const carray<T>& a, Shape s, const char* name) {
  require(a.ndim() == 1 && a.shape(0) == s.channels,
          std::string(name) + ": expected a 1-d array of length C = " + std::to_string(s.channels));
}

template <typename T>
const T* optional_data(const opt_carray<T>& a, Shape s, const char* name) {
  if (!a) return nullptr;
  per_channel(*a, s, name);
  return a->data();
}

template <typename T>
T* optional_mutable(opt_carray<T>& a, Shape s, const char* name) {
  if (!a) return nullptr;
  per_channel(*a, s, name);
  require(a->writeable(), std::string(name) + ": must be writeable");
  return a->mutable_data();
}

template <typename T>
T* mutable_out(carray<T>& a, const char* name) {
  require(a.writeable(), std::string(name) + ": must be writeable");
  return a.mutable_data();
}

// ---- bound functions ----------------------------------------------------------------------------

template <typename T>
void channel_stats(const carray<T>& x, carray<double>& mean, carray<double>& m2) {
  const Shape s = view3(x, "x");
  per_channel(mean, s, "mean");
  per_channel(m2, s, "m2");
  double* pm = mutable_out(mean, "mean");
  double* pm2 = mutable_out(m2, "m2");
  // safe without the GIL: every buffer is held by the caller's references and validated above
  py::gil_scoped_release release;
  bnkernel::channel_stats(x.data(), s, pm, pm2);
}

// A mask over the positions: (outer, inner) bytes, as x's (outer, C, inner) view without C.
const uint8_t* position_mask(const carray<uint8_t>& mask, Shape s) {
  require(mask.ndim() == 2 && mask.shape(0) == s.outer && mask.shape(1) == s.inner,
          "mask: expected an (outer, inner) array of x's positions");
  return mask.data();
}

template <typename T>
int64_t masked_channel_stats(const carray<T>& x, const carray<uint8_t>& mask, carray<double>& mean,
                             carray<double>& m2) {
  const Shape s = view3(x, "x");
  const uint8_t* pmask = position_mask(mask, s);
  per_channel(mean, s, "mean");
  per_channel(m2, s, "m2");
  double* pm = mutable_out(mean, "mean");
  double* pm2 = mutable_out(m2, "m2");
  py::gil_scoped_release release;
  return bnkernel::masked_channel_stats(x.data(), s, pmask, pm, pm2);
}

int64_t merge_stats_impl(const carray<int64_t>& counts, const carray<double>& means,
                         const carray<double>& m2s, carray<double>& mean, carray<double>& m2) {
  require(counts.ndim() == 1, "counts: expected a 1-d array");
  const int64_t parts = counts.shape(0);
  require(means.ndim() == 2 && means.shape(0) == parts, "means: expected shape (parts, C)");
  const int64_t channels = means.shape(1);
  require(m2s.ndim() == 2 && m2s.shape(0) == parts && m2s.shape(1) == channels,
          "m2s: expected the shape of means");
  require(mean.ndim() == 1 && mean.shape(0) == channels, "mean: expected length C");
  require(m2.ndim() == 1 && m2.shape(0) == channels, "m2: expected length C");
  for (int64_t p = 0; p < parts; ++p) require(counts.at(p) >= 0, "counts: must be >= 0");
  int64_t count = 0;
  double* pm = mutable_out(mean, "mean");
  double* pm2 = mutable_out(m2, "m2");
  py::gil_scoped_release release;
  bnkernel::merge_stats(parts, channels, counts.data(), means.data(), m2s.data(), &count, pm, pm2);
  return count;
}

template <typename T>
bnkernel::Epilogue<T> epilogue(const opt_carray<T>& residual, bool relu, Shape s) {
  if (residual) same_shape(*residual, s, "residual");
  return {residual ? residual->data() : nullptr, relu};
}

template <typename T>
bnkernel::ReluGrad<T> relu_grad(const opt_carray<T>& y, opt_carray<T>& dresidual, Shape s) {
  if (y) same_shape(*y, s, "y");
  require(y || !dresidual, "dresidual: needs y (the ReLU mask)");
  if (dresidual) same_shape(*dresidual, s, "dresidual");
  return {y ? y->data() : nullptr, dresidual ? mutable_out(*dresidual, "dresidual") : nullptr};
}

template <typename T>
void normalize(const carray<T>& x, const carray<double>& mean, const carray<double>& invstd,
               const opt_carray<Param<T>>& gamma, const opt_carray<Param<T>>& beta, carray<T>& y,
               const opt_carray<T>& residual, bool relu) {
  const Shape s = view3(x, "x");
  const auto ep = epilogue(residual, relu, s);
  per_channel(mean, s, "mean");
  per_channel(invstd, s, "invstd");
  same_shape(y, s, "out");
  const Param<T>* pg = optional_data(gamma, s, "gamma");
  const Param<T>* pb = optional_data(beta, s, "beta");
  T* py_ = mutable_out(y, "out");
  // safe without the GIL: every buffer is held by the caller's references and validated above
  py::gil_scoped_release release;
  bnkernel::normalize(x.data(), s, mean.data(), invstd.data(), pg, pb, py_, ep);
}

template <typename T>
void forward_train(const carray<T>& x, const opt_carray<Param<T>>& gamma,
                   const opt_carray<Param<T>>& beta, double eps, carray<T>& y, carray<double>& mean,
                   carray<double>& invstd, opt_carray<Param<T>>& running_mean,
                   opt_carray<Param<T>>& running_var, double momentum, bool unbiased,
                   const opt_carray<T>& residual, bool relu) {
  const Shape s = view3(x, "x");
  const auto ep = epilogue(residual, relu, s);
  same_shape(y, s, "out");
  per_channel(mean, s, "mean");
  per_channel(invstd, s, "invstd");
  const Param<T>* pg = optional_data(gamma, s, "gamma");
  const Param<T>* pb = optional_data(beta, s, "beta");
  bnkernel::RunningUpdate<Param<T>> running{optional_mutable(running_mean, s, "running_mean"),
                                            optional_mutable(running_var, s, "running_var"),
                                            momentum, unbiased};
  T* py_ = mutable_out(y, "out");
  double* pm = mutable_out(mean, "mean");
  double* pi = mutable_out(invstd, "invstd");
  // safe without the GIL: every buffer is held by the caller's references and validated above
  py::gil_scoped_release release;
  bnkernel::forward_train(x.data(), s, pg, pb, eps, py_, pm, pi, running, ep);
}

template <typename T>
void backward_reduce(const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
                     const carray<double>& invstd, carray<double>& sum_dy,
                     carray<double>& sum_dy_xhat, const opt_carray<T>& y,
                     opt_carray<T>& dresidual) {
  const Shape s = view3(x, "x");
  const auto relu = relu_grad(y, dresidual, s);
  same_shape(dy, s, "dy");
  per_channel(mean, s, "mean");
  per_channel(invstd, s, "invstd");
  per_channel(sum_dy, s, "sum_dy");
  per_channel(sum_dy_xhat, s, "sum_dy_xhat");
  double* p1 = mutable_out(sum_dy, "sum_dy");
  double* p2 = mutable_out(sum_dy_xhat, "sum_dy_xhat");
  py::gil_scoped_release release;
  bnkernel::backward_reduce(dy.data(), x.data(), s, mean.data(), invstd.data(), p1, p2, relu);
}

template <typename T>
void backward_elementwise(const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
                          const carray<double>& invstd, const opt_carray<Param<T>>& gamma,
                          const carray<double>& sum_dy, const carray<double>& sum_dy_xhat,
                          int64_t count, carray<T>& dx, const opt_carray<T>& y,
                          const std::optional<carray<uint8_t>>& mask) {
  const Shape s = view3(x, "x");
  const uint8_t* pmask = mask ? position_mask(*mask, s) : nullptr;
  opt_carray<T> no_dresidual;
  const auto relu = relu_grad(y, no_dresidual, s);
  same_shape(dy, s, "dy");
  same_shape(dx, s, "out");
  per_channel(mean, s, "mean");
  per_channel(invstd, s, "invstd");
  per_channel(sum_dy, s, "sum_dy");
  per_channel(sum_dy_xhat, s, "sum_dy_xhat");
  require(count > 0, "count: must be > 0");
  const Param<T>* pg = optional_data(gamma, s, "gamma");
  T* pdx = mutable_out(dx, "out");
  py::gil_scoped_release release;
  if (pmask) {
    bnkernel::masked_backward_elementwise(dy.data(), x.data(), s, pmask, mean.data(), invstd.data(),
                                          pg, sum_dy.data(), sum_dy_xhat.data(), count, pdx, relu);
  } else {
    bnkernel::backward_elementwise(dy.data(), x.data(), s, mean.data(), invstd.data(), pg,
                                   sum_dy.data(), sum_dy_xhat.data(), count, pdx, relu);
  }
}

template <typename T>
void backward(bool training, const carray<T>& dy, const carray<T>& x, const carray<double>& mean,
              const carray<double>& invstd, const opt_carray<Param<T>>& gamma, carray<T>& dx,
              carray<Param<T>>& dgamma, carray<Param<T>>& dbeta, const opt_carray<T>& y,
              opt_carray<T>& dresidual) {
  const Shape s = view3(x, "x");
  const auto relu = relu_grad(y, dresidual, s);
  same_shape(dy, s, "dy");
  same_shape(dx, s, "out");
  per_channel(mean, s, "mean");
  per_channel(invstd, s, "invstd");
  per_channel(dgamma, s, "dgamma");
  per_channel(dbeta, s, "dbeta");
  const Param<T>* pg = optional_data(gamma, s, "gamma");
  T* pdx = mutable_out(dx, "out");
  Param<T>* pdg = mutable_out(dgamma, "dgamma");
  Param<T>* pdb = mutable_out(dbeta, "dbeta");
  // safe without the GIL: every buffer is held by the caller's references and validated above
  py::gil_scoped_release release;
  if (training) {
    bnkernel::backward_train(dy.data(), x.data(), s, mean.data(), invstd.data(), pg, pdx, pdg, pdb,
                             relu);
  } else {
    bnkernel::backward_frozen(dy.data(), x.data(), s, mean.data(), invstd.data(), pg, pdx, pdg, pdb,
                              relu);
  }
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
  m.def("backward", &backward<T>, py::arg("training"), py::arg("dy").noconvert(),
        py::arg("x").noconvert(), py::arg("mean").noconvert(), py::arg("invstd").noconvert(),
        py::arg("gamma").noconvert().none(true), py::arg("out").noconvert(),
        py::arg("dgamma").noconvert(), py::arg("dbeta").noconvert(),
        py::arg("y").noconvert().none(true) = py::none(),
        py::arg("dresidual").noconvert().none(true) = py::none());
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "bnkernel's compiled kernels. Use the bnkernel package, not this module directly.";
  register_dtype<float>(m);
  register_dtype<double>(m);
  register_dtype<bnkernel::float16>(m);
  register_dtype<bnkernel::bfloat16>(m);
  m.def("merge_stats", &merge_stats_impl, py::arg("counts").noconvert(),
        py::arg("means").noconvert(), py::arg("m2s").noconvert(), py::arg("mean").noconvert(),
        py::arg("m2").noconvert());
  m.def("set_num_threads", &bnkernel::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &bnkernel::get_num_threads);
  m.def("workspace_allocations", &bnkernel::workspace_allocations);
  if (!bnkernel_python::add_fast_paths(m.ptr())) throw py::error_already_set();
  m.attr("have_openmp") = bnkernel::have_openmp();
  m.attr("isa") = bnkernel::isa_name();
  m.attr("version") = BNKERNEL_VERSION;
  m.attr("native_build") = static_cast<bool>(BNKERNEL_NATIVE_BUILD);
  m.attr("cuda") = false;  // this version has CPU kernels only
  m.attr("sanitized") = static_cast<bool>(BNKERNEL_SANITIZED);
}
