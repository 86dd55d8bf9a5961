"""pytest-benchmark suite: bnkernel next to the NumPy textbook and torch, grouped by op, layout and
dtype, so each group's table compares the implementations on the same data.

    python -m pytest benchmarks --benchmark-only -q
    python -m pytest benchmarks --benchmark-only -q -k "NCHW and float32"
    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json

Every benchmark checks its implementation's result against the float64 reference
(:mod:`bnkernel.reference`) before and after timing, outside the timed function: a fast wrong kernel
fails.  bnkernel and torch run with preallocated outputs where they offer them (the same calls as
``python -m bnkernel bench``, see :mod:`bnkernel._bench`); torch is skipped when not importable.
Threads: each library's default (all cores unless ``OMP_NUM_THREADS`` says otherwise).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from bnkernel import _bench

pytest.importorskip("pytest_benchmark")

# Moderate sizes, so the suite runs in about a minute: a ResNet-like NCHW / NHWC activation
# (6.4 MB in float32) and a wide dense-layer batch.
SHAPES = {"NCHW": (32, 64, 28, 28), "NHWC": (32, 64, 28, 28), "NC": (4096, 256)}
OPS = ["forward_train", "forward_infer", "backward_train"]
DTYPES = ["float32", "float64"]
IMPLS = ["bnkernel", "numpy", "torch"]
OVERHEAD_SHAPE = (64, 3)  # per-call overhead: the whole Python call on a tiny input


@functools.cache
def get_case(shape: tuple[int, ...], layout: str, dtype: str) -> _bench.Case:
    return _bench.make_case(shape, layout, dtype)


def _torch_or_skip(impl: str) -> ModuleType | None:
    if impl != "torch":
        return None
    return pytest.importorskip("torch")


def _params() -> list[Any]:
    out = []
    for op in OPS:
        for layout, shape in SHAPES.items():
            for dtype in DTYPES:
                group = f"{op}-{layout}-{dtype}"
                mark = pytest.mark.benchmark(group=group)
                for impl in IMPLS:
                    args = (op, layout, shape, dtype, impl)
                    out.append(pytest.param(*args, marks=mark, id=f"{group}-{impl}"))
    return out


def _run(benchmark: Any, case: _bench.Case, op: str, impl: str) -> None:
    torch = _torch_or_skip(impl)
    prepared = _bench.prepare(case, op, impl, torch)
    peer = impl != "bnkernel"
    _bench.check_outputs(case, op, prepared.outputs(), peer=peer, who=impl)
    benchmark.extra_info.update(
        {"variant": prepared.variant, "bytes": case.nbytes, "shape": case.shape_text}
    )
    benchmark(prepared.call)
    # and once more after the timed runs (warm caches, thread pools up): still right
    _bench.check_outputs(case, op, prepared.outputs(), peer=peer, who=impl)


@pytest.mark.parametrize(("op", "layout", "shape", "dtype", "impl"), _params())
def test_kernel(
    benchmark: Any, op: str, layout: str, shape: tuple[int, ...], dtype: str, impl: str
) -> None:
    _run(benchmark, get_case(shape, layout, dtype), op, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.benchmark(group="overhead-64x3-float32")
def test_call_overhead(benchmark: Any, op: str, impl: str) -> None:
    """The whole call on a 64x3 input: argument checks, dispatch, a kernel on 192 values."""
    _run(benchmark, get_case(OVERHEAD_SHAPE, "NC", "float32"), op, impl)


def test_wrong_kernel_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check the benchmarks rely on rejects a kernel that is off by a little."""
    real = _bench._fn.batch_norm_forward

    def off_by_a_bit(*args: Any, **kwargs: Any) -> Any:
        y, mean, invstd = real(*args, **kwargs)
        y *= np.asarray(1.0001, dtype=y.dtype)
        return y, mean, invstd

    monkeypatch.setattr(_bench._fn, "batch_norm_forward", off_by_a_bit)
    case = get_case(SHAPES["NC"], "NC", "float32")
    prepared = _bench.prepare(case, "forward_infer", "bnkernel")
    with pytest.raises(_bench.BenchCheckError):
        _bench.check_outputs(case, "forward_infer", prepared.outputs())


# ---- fused epilogue: y = relu(bn(x) + residual), and its backward from y -------------------------

FUSED_SHAPES = {"NCHW": ((32, 64, 28, 28), 1), "NHWC": ((32, 28, 28, 64), -1)}


def _fused_case(layout: str) -> dict[str, Any]:
    from bnkernel import reference

    shape, axis = FUSED_SHAPES[layout]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    res = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    z, _, _ = reference.forward_train(x, None, None, 1e-5, axis)
    y_ref = reference.apply_epilogue(z, res, True)
    return {"x": x, "res": res, "dy": dy, "axis": axis, "y_ref": y_ref}


@pytest.mark.parametrize("layout", list(FUSED_SHAPES))
@pytest.mark.parametrize("variant", ["fused", "unfused"])
def test_fused_forward(benchmark: Any, layout: str, variant: str) -> None:
    """One pass (bnkernel's epilogue) against three (normalize, add, relu as separate passes)."""
    import bnkernel as bk

    benchmark.group = f"relu(bn(x)+r)-forward-{layout}"
    c = _fused_case(layout)
    out = np.empty_like(c["x"])

    def fused() -> None:
        bk.batch_norm_forward(c["x"], axis=c["axis"], activation="relu", residual=c["res"],
                              out=out)  # fmt: skip

    def unfused() -> None:
        bk.batch_norm_forward(c["x"], axis=c["axis"], out=out)
        np.add(out, c["res"], out=out)
        np.maximum(out, 0, out=out)

    fn = fused if variant == "fused" else unfused
    fn()
    np.testing.assert_allclose(out, c["y_ref"], rtol=1e-5, atol=1e-5)
    benchmark(fn)


@pytest.mark.parametrize("layout", list(FUSED_SHAPES))
@pytest.mark.parametrize("variant", ["fused", "unfused"])
def test_fused_backward(benchmark: Any, layout: str, variant: str) -> None:
    """The mask taken from y inside the backward's two passes, against np.where(y > 0, dy, 0)
    first (its output is the residual's gradient in both)."""
    import bnkernel as bk
    from bnkernel import reference

    benchmark.group = f"relu(bn(x)+r)-backward-{layout}"
    c = _fused_case(layout)
    y, mean, invstd = bk.batch_norm_forward(c["x"], axis=c["axis"], activation="relu",
                                            residual=c["res"])  # fmt: skip
    dx = np.empty_like(c["x"])
    g = np.empty_like(c["x"])

    def fused() -> Any:
        return bk.batch_norm_backward(
            c["dy"],
            c["x"],
            mean,
            invstd,
            axis=c["axis"],
            activation="relu",
            y=y,
            residual_grad=True,
            out=dx,
        )

    def unfused() -> Any:
        np.copyto(g, np.where(y > 0, c["dy"], np.float32(0)))
        return bk.batch_norm_backward(g, c["x"], mean, invstd, axis=c["axis"], out=dx)

    fn = fused if variant == "fused" else unfused
    fn()
    want = reference.backward_train(reference.relu_backward(c["dy"], y), c["x"], mean, invstd,
                                    None, c["axis"])[0]  # fmt: skip
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)
    benchmark(fn)
