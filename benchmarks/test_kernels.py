"""pytest-benchmark suite: bnkernel next to the NumPy textbook and torch, grouped by op, layout and
dtype, so each group's table compares the implementations on the same data.

    python -m pytest benchmarks --benchmark-only -q
    python -m pytest benchmarks --benchmark-only -q -k "NCHW and float32"
    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json

Every benchmark checks its implementation's result against the float64 reference
(:mod:`bnkernel.reference`) before and after timing, outside the timed function: a fast wrong kernel
fails.  bnkernel and torch run with preallocated outputs where they offer them (the same calls as
``python -m bnkernel bench``, see :mod:`bnkernel.bench`); torch is skipped when not importable.
Threads: each library's default (all cores unless ``OMP_NUM_THREADS`` says otherwise).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from bnkernel import bench as _bench
from bnkernel import functional

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
    real = functional.batch_norm_forward

    def off_by_a_bit(*args: Any, **kwargs: Any) -> Any:
        y, mean, invstd = real(*args, **kwargs)
        y *= np.asarray(1.0001, dtype=y.dtype)
        return y, mean, invstd

    monkeypatch.setattr(functional, "batch_norm_forward", off_by_a_bit)
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


# ---- masks: padded sequences ---------------------------------------------------------------------

MASK_SHAPES = {"NLC": ((64, 512, 256), -1), "NCL": ((64, 256, 512), 1)}


def _mask_case(layout: str) -> dict[str, Any]:
    shape, axis = MASK_SHAPES[layout]
    rng = np.random.default_rng(0)
    lengths = rng.integers(256, 513, 64)  # each sequence 256-512 steps long, padded to 512
    mask = np.arange(512)[None, :] < lengths[:, None]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    return {"x": x, "dy": dy, "mask": mask, "axis": axis}


@pytest.mark.parametrize("layout", list(MASK_SHAPES))
@pytest.mark.parametrize("variant", ["masked", "unmasked"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_masked(benchmark: Any, layout: str, variant: str, op: str) -> None:
    """A masked training step against the unmasked one on the same array: the mask is read inside
    the kernels' passes, so the two should cost the same."""
    import bnkernel as bk
    from bnkernel import reference

    benchmark.group = f"mask-{op}-{layout}"
    c = _mask_case(layout)
    mask = c["mask"] if variant == "masked" else None
    ax = c["axis"]
    y, mean, invstd = bk.batch_norm_forward(c["x"], axis=ax, mask=mask)
    out = np.empty_like(c["x"])
    if op == "forward":
        if mask is not None:
            want = reference.masked_forward(c["x"], mask, None, None, 1e-5, ax)[0]
        else:
            want = reference.forward_train(c["x"], None, None, 1e-5, ax)[0]
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        benchmark(lambda: bk.batch_norm_forward(c["x"], axis=ax, mask=mask, out=out))
    else:
        dx = bk.batch_norm_backward(c["dy"], c["x"], mean, invstd, axis=ax, mask=mask)[0]
        if mask is not None:
            want = reference.masked_backward(c["dy"], c["x"], mean, invstd, mask, None, ax)[0]
        else:
            want = reference.backward_train(c["dy"], c["x"], mean, invstd, None, ax)[0]
        np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4)
        benchmark(lambda: bk.batch_norm_backward(c["dy"], c["x"], mean, invstd, axis=ax,
                                                 mask=mask, out=out))  # fmt: skip


# ---- 16-bit data ---------------------------------------------------------------------------------

HALF_SHAPES = {"NCHW": ((32, 64, 56, 56), 1), "NHWC": ((32, 56, 56, 64), -1)}


@pytest.mark.parametrize("layout", list(HALF_SHAPES))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("impl", ["bnkernel", "torch"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_half(benchmark: Any, layout: str, dtype: str, impl: str, op: str) -> None:
    """Training forward and backward on 16-bit data (float32 parameters), bnkernel next to torch's
    mixed-precision CPU path and to both on float32, same data; outputs checked against the
    float64 reference to the dtype's resolution before timing."""
    import bnkernel as bk
    from bnkernel import reference

    ml_dtypes = pytest.importorskip("ml_dtypes")
    benchmark.group = f"half-{op}-{layout}"
    shape, axis = HALF_SHAPES[layout]
    ndt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32).astype(ndt)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(ndt)
    C = shape[axis]
    g = np.ones(C, np.float32)
    b = np.zeros(C, np.float32)
    rtol = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 1e-5}[dtype]
    y_ref, mean_ref, invstd_ref = reference.forward_train(x, g, b, 1e-5, axis)
    if impl == "bnkernel":
        y, mean, invstd = bk.batch_norm_forward(x, g, b, axis=axis)
        dx = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)[0]
        out = np.empty_like(x)

        def forward() -> Any:
            return bk.batch_norm_forward(x, g, b, axis=axis, out=out)

        def backward() -> Any:
            return bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, out=out)

        got_y, got_dx = y.astype(np.float64), dx.astype(np.float64)
    else:
        torch = pytest.importorskip("torch")
        tdt = getattr(torch, dtype)
        memory = torch.channels_last if axis == -1 else torch.contiguous_format
        # torch's NCHW view of the same values (channels-last memory for NHWC)
        base = torch.from_numpy(x.astype(np.float32))
        tx = (base.permute(0, 3, 1, 2) if axis == -1 else base).to(tdt)
        tx = tx.contiguous(memory_format=memory).requires_grad_(True)
        tdy = torch.from_numpy(dy.astype(np.float32))
        tdy = (
            (tdy.permute(0, 3, 1, 2) if axis == -1 else tdy)
            .to(tdt)
            .contiguous(memory_format=memory)
        )
        tg = torch.from_numpy(g).requires_grad_(True)
        tb = torch.from_numpy(b).requires_grad_(True)
        F = torch.nn.functional

        def forward() -> Any:
            with torch.no_grad():
                return F.batch_norm(tx, None, None, tg, tb, training=True)

        ty = F.batch_norm(tx, None, None, tg, tb, training=True)

        def backward() -> Any:
            return torch.autograd.grad(ty, (tx, tg, tb), tdy, retain_graph=True)

        to_np = (lambda t: t.permute(0, 2, 3, 1)) if axis == -1 else (lambda t: t)
        got_y = to_np(ty.detach().float()).numpy().astype(np.float64)
        got_dx = to_np(backward()[0].float()).numpy().astype(np.float64)
    np.testing.assert_allclose(got_y, y_ref, rtol=rtol, atol=rtol * 8)
    dx_ref = reference.backward_train(dy, x, mean_ref, invstd_ref, g, axis)[0]
    np.testing.assert_allclose(got_dx, dx_ref, rtol=rtol, atol=rtol * 8)
    benchmark(forward if op == "forward" else backward)
