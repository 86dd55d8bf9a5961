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
  if (name == "float16") return bc::DType::kFloat16;
  if (name == "bfloat16") return bc::DType::kBFloat16;
  throw py::value_error("dtype: expected 'float32', 'float64', 'float16' or 'bfloat16', got '" +
                        name + "'");
}

bc::DType param_dtype_of(const std::string& name) {
  if (name == "float32") return bc::DType::kFloat32;
  if (name == "float64") return bc::DType::kFloat64;
  throw py::value_error("param_dtype: expected 'float32' or 'float64', got '" + name + "'");
}

bc::Shape shape_of(int64_t outer, int64_t channels, int64_t inner) {
  if (outer < 0 || channels < 0 || inner < 0) {
    throw py::value_error("shape: expected non-negative (outer, channels, inner)");
  }
  return bc::Shape{outer, channels, inner};
}

bc::Launch launch_of(uintptr_t stream, int device) {
  if (device < -1) throw py::value_error("device: expected an index >= 0, or -1 (the current)");
  return bc::Launch{stream, device};
}

int64_t channels_of(int64_t channels) {
  if (channels < 0) throw py::value_error("channels: expected a count >= 0");
  return channels;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "bnkernel's CUDA kernels (raw: device addresses, 0 for an absent optional array; the "
      "arguments are checked by the Python layer, bnkernel._device)";
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
      py::arg("outer"), py::arg("channels"), py::arg("inner"),
      "Parts per channel of channel_stats and channel_sums (their workspaces: 3 and 2 * channels "
      "* parts float64).");

  m.def(
      "channel_stats",
      [](const std::string& dtype, uintptr_t x, int64_t outer, int64_t channels, int64_t inner,
         uintptr_t mean, uintptr_t m2, uintptr_t workspace, uintptr_t mask, uintptr_t stream,
         int device) {
        const bc::DType dt = dtype_of(dtype);
        const bc::Shape s = shape_of(outer, channels, inner);
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::channel_stats(dt, x, s, mask, mean, m2, workspace, l);
      },
      py::arg("dtype"), py::arg("x"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
      py::arg("mean"), py::arg("m2"), py::arg("workspace"), py::arg("mask") = 0,
      py::arg("stream") = 0, py::arg("device") = -1,
      "Per-channel mean and M2 (float64 device arrays of C) of the valid values, deterministic.");

  m.def(
      "finish_stats",
      [](const std::string& param_dtype, int64_t channels, int64_t count, uintptr_t mean,
         uintptr_t m2, double eps, uintptr_t invstd, uintptr_t running_mean, uintptr_t running_var,
         double momentum, bool unbiased, uintptr_t stream, int device) {
        const bc::DType pt = param_dtype_of(param_dtype);
        const int64_t C = channels_of(channels);
        if (count < 1) throw py::value_error("count: expected a count >= 1");
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::finish_stats(pt, C, count, mean, m2, eps, invstd, running_mean, running_var, momentum,
                         unbiased, l);
      },
      py::arg("param_dtype"), py::arg("channels"), py::arg("count"), py::arg("mean"), py::arg("m2"),
      py::arg("eps"), py::arg("invstd"), py::arg("running_mean") = 0, py::arg("running_var") = 0,
      py::arg("momentum") = 0.0, py::arg("unbiased") = true, py::arg("stream") = 0,
      py::arg("device") = -1,
      "invstd = 1 / sqrt(M2 / count + eps) and the running update, per channel.");

  m.def(
      "running_coefficients",
      [](const std::string& param_dtype, int64_t channels, uintptr_t running_mean,
         uintptr_t running_var, double eps, uintptr_t mean, uintptr_t invstd, uintptr_t stream,
         int device) {
        const bc::DType pt = param_dtype_of(param_dtype);
        const int64_t C = channels_of(channels);
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::running_coefficients(pt, C, running_mean, running_var, eps, mean, invstd, l);
      },
      py::arg("param_dtype"), py::arg("channels"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("eps"), py::arg("mean"), py::arg("invstd"), py::arg("stream") = 0,
      py::arg("device") = -1, "Inference's mean and invstd (float64) from the running statistics.");

  m.def(
      "channel_sums",
      [](const std::string& dtype, uintptr_t dy, uintptr_t x, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t mean, uintptr_t invstd, uintptr_t sum_dy, uintptr_t sum_dy_xhat,
         uintptr_t workspace, uintptr_t y, uintptr_t mask, uintptr_t dresidual, uintptr_t dgamma,
         uintptr_t dbeta, uintptr_t stream, int device) {
        const bc::DType dt = dtype_of(dtype);
        const bc::Shape s = shape_of(outer, channels, inner);
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::channel_sums(dt, dy, x, s, mean, invstd, y, mask, sum_dy, sum_dy_xhat, dresidual,
                         dgamma, dbeta, workspace, l);
      },
      py::arg("dtype"), py::arg("dy"), py::arg("x"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("mean"), py::arg("invstd"), py::arg("sum_dy"),
      py::arg("sum_dy_xhat"), py::arg("workspace"), py::arg("y") = 0, py::arg("mask") = 0,
      py::arg("dresidual") = 0, py::arg("dgamma") = 0, py::arg("dbeta") = 0, py::arg("stream") = 0,
      py::arg("device") = -1,
      "Per-channel sum(dy) and sum(dy * xhat), float64, deterministic (workspace: 2 * channels * "
      "stats_parts float64); dgamma and dbeta in the parameter dtype when given.");

  m.def(
      "backward_dx",
      [](const std::string& dtype, bool training, uintptr_t dy, uintptr_t x, int64_t outer,
         int64_t channels, int64_t inner, int64_t count, uintptr_t mean, uintptr_t invstd,
         uintptr_t gamma, uintptr_t sum_dy, uintptr_t sum_dy_xhat, uintptr_t dx, uintptr_t y,
         uintptr_t mask, uintptr_t stream, int device) {
        const bc::DType dt = dtype_of(dtype);
        const bc::Shape s = shape_of(outer, channels, inner);
        if (training && count < 1 && s.outer * s.channels * s.inner > 0) {
          throw py::value_error("count: expected a count >= 1");
        }
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::backward_dx(dt, training, dy, x, s, count, mean, invstd, gamma, sum_dy, sum_dy_xhat, y,
                        mask, dx, l);
      },
      py::arg("dtype"), py::arg("training"), py::arg("dy"), py::arg("x"), py::arg("outer"),
      py::arg("channels"), py::arg("inner"), py::arg("count"), py::arg("mean"), py::arg("invstd"),
      py::arg("gamma"), py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("dx"), py::arg("y") = 0,
      py::arg("mask") = 0, py::arg("stream") = 0, py::arg("device") = -1,
      "dx of the training or the frozen backward, in double, rounded once.");

  m.def(
      "normalize",
      [](const std::string& dtype, uintptr_t x, int64_t outer, int64_t channels, int64_t inner,
         uintptr_t mean, uintptr_t invstd, uintptr_t gamma, uintptr_t beta, uintptr_t y,
         uintptr_t residual, bool relu, uintptr_t stream, int device) {
        const bc::DType dt = dtype_of(dtype);
        const bc::Shape s = shape_of(outer, channels, inner);
        const bc::Launch l = launch_of(stream, device);
        py::gil_scoped_release nogil;
        bc::normalize(dt, x, s, mean, invstd, gamma, beta, residual, relu, y, l);
      },
      py::arg("dtype"), py::arg("x"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
      py::arg("mean"), py::arg("invstd"), py::arg("gamma"), py::arg("beta"), py::arg("y"),
      py::arg("residual") = 0, py::arg("relu") = false, py::arg("stream") = 0,
      py::arg("device") = -1,
      "y = (x - mean) * gamma * invstd + beta (+ residual, relu) per channel, in double, rounded "
      "once.");
}
