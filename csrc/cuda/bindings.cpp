// bnkernel._cuda: the CUDA kernels (csrc/cuda/kernels.cu) for Python.  A module of its own, built
// only with -DBNKERNEL_CUDA=ON, so that a CPU-only install never loads CUDA; the CUDA runtime is
// linked in statically, so it needs the driver alone.  These are the raw kernels on device
// addresses (the arguments are checked by the Python layer); nothing here synchronizes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cuda/api.hpp"

namespace py = pybind11;
namespace bc = bnkernel::cuda;

namespace {

bc::DType dtype_of(const std::string& name) {
  if (name == "float32") return bc::DType::kFloat32;
  if (name == "float64") return bc::DType::kFloat64;
  throw py::value_error("dtype: expected 'float32' or 'float64', got '" + name + "'");
}

bc::Shape shape_of(int64_t outer, int64_t channels, int64_t inner) {
  if (outer < 0 || channels < 0 || inner < 0) {
    throw py::value_error("shape: expected non-negative (outer, channels, inner)");
  }
  return bc::Shape{outer, channels, inner};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "bnkernel's CUDA kernels (raw: device addresses, checked by the Python layer)";
  m.def(
      "info",
      [] {
        const bc::Info i = bc::info();
        py::list devices;
        for (const bc::Device& d : i.devices) {
          py::dict dd;
          dd["index"] = d.index;
          dd["name"] = d.name;
          dd["compute_capability"] = py::make_tuple(d.major, d.minor);
          dd["memory"] = d.memory;
          dd["multiprocessors"] = d.multiprocessors;
          devices.append(dd);
        }
        py::dict r;
        r["runtime_version"] = i.runtime_version;
        r["driver_version"] = i.driver_version;
        r["error"] = i.error.empty() ? py::object(py::none()) : py::object(py::str(i.error));
        r["devices"] = devices;
        return r;
      },
      "The CUDA runtime (linked in), the driver and the devices; 'error' says why none is usable.");

  m.def(
      "stats_parts",
      [](int64_t outer, int64_t channels, int64_t inner) {
        return bc::stats_parts(shape_of(outer, channels, inner));
      },
      "Parts per channel of channel_stats (its workspace: 3 * channels * parts float64).");

  m.def(
      "channel_stats",
      [](const std::string& dtype, uintptr_t x, int64_t outer, int64_t channels, int64_t inner,
         uintptr_t mean, uintptr_t m2, uintptr_t workspace, uintptr_t stream) {
        bc::channel_stats(dtype_of(dtype), x, shape_of(outer, channels, inner), mean, m2, workspace,
                          stream);
      },
      py::arg("dtype"), py::arg("x"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
      py::arg("mean"), py::arg("m2"), py::arg("workspace"), py::arg("stream") = 0,
      "Per-channel mean and M2 (float64 device arrays of C), deterministic.");

  m.def(
      "channel_sums",
      [](const std::string& dtype, uintptr_t dy, uintptr_t x, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t mean, uintptr_t sum_dy, uintptr_t sum_dy_xmu, uintptr_t workspace,
         uintptr_t stream) {
        bc::channel_sums(dtype_of(dtype), dy, x, shape_of(outer, channels, inner), mean, sum_dy,
                         sum_dy_xmu, workspace, stream);
      },
      py::arg("dtype"), py::arg("dy"), py::arg("x"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("mean"), py::arg("sum_dy"), py::arg("sum_dy_xmu"),
      py::arg("workspace"), py::arg("stream") = 0,
      "Per-channel sum(dy) and sum(dy * (x - mean)), float64, deterministic "
      "(workspace: 2 * channels * stats_parts float64).");

  m.def(
      "backward_dx",
      [](const std::string& dtype, bool training, uintptr_t dy, uintptr_t x, int64_t outer,
         int64_t channels, int64_t inner, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
         uintptr_t sum_dy, uintptr_t sum_dy_xmu, uintptr_t dx, uintptr_t stream) {
        bc::backward_dx(dtype_of(dtype), training, dy, x, shape_of(outer, channels, inner), mean,
                        invstd, gamma, sum_dy, sum_dy_xmu, dx, stream);
      },
      py::arg("dtype"), py::arg("training"), py::arg("dy"), py::arg("x"), py::arg("outer"),
      py::arg("channels"), py::arg("inner"), py::arg("mean"), py::arg("invstd"), py::arg("gamma"),
      py::arg("sum_dy"), py::arg("sum_dy_xmu"), py::arg("dx"), py::arg("stream") = 0,
      "dx of the training or the frozen backward, in double, rounded once.");

  m.def(
      "normalize",
      [](const std::string& dtype, uintptr_t x, int64_t outer, int64_t channels, int64_t inner,
         uintptr_t mean, uintptr_t invstd, uintptr_t gamma, uintptr_t beta, uintptr_t y,
         uintptr_t stream) {
        bc::normalize(dtype_of(dtype), x, shape_of(outer, channels, inner), mean, invstd, gamma,
                      beta, y, stream);
      },
      py::arg("dtype"), py::arg("x"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
      py::arg("mean"), py::arg("invstd"), py::arg("gamma"), py::arg("beta"), py::arg("y"),
      py::arg("stream") = 0,
      "y = (x - mean) * gamma * invstd + beta per channel, in double, rounded once.");
}
