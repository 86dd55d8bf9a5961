"""The compiled per-call fast path of batch_norm_forward / batch_norm_backward (csrc/fastpath.cpp).

It takes the plain case (exact ndarrays of the right dtypes, contiguous and aligned, Python
scalars) in one call and declines everything else to the checked Python path.  The rest of the
suite runs with it on, so its results are checked against the reference there; here:

* plain calls really take it (a fast path that always declined would pass everything else);
* it agrees with the checked path bit for bit on every layout, dtype and option;
* each kind of non-plain argument is declined, and the public call still gives the same result
  (or, for an invalid argument, the checked path's error: tests/test_errors.py);
* no reference is leaked or lost.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import LAYOUTS, layout_params, random_arrays

import bnkernel as bk
from bnkernel import _core
from bnkernel import functional as F


@pytest.fixture
def checked_path() -> Iterator[None]:
    """Runs the test body with the fast path switched off."""
    F._FAST_PATH = False
    try:
        yield
    finally:
        F._FAST_PATH = True


def make(shape: tuple[int, ...], axis: int, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """The call's arrays; 16-bit data have float32 parameters and running statistics."""
    d = random_arrays(shape, axis, np.float32 if dtype == BF16 else dtype, seed, gamma=(0.5, 2.0))
    if np.dtype(dtype).itemsize == 2:
        for k in ("x", "dy"):
            d[k] = d[k].astype(dtype)
        for k in ("g", "b", "rm", "rv"):
            d[k] = d[k].astype(np.float32)
    return d


# the data dtypes the fast path takes: bfloat16 (ml_dtypes' type, with a type number NumPy
# assigns at run time) when ml_dtypes is installed
try:
    import ml_dtypes

    BF16: Any = ml_dtypes.bfloat16
except ImportError:
    ml_dtypes = None
    BF16 = None
FAST_DTYPES = pytest.mark.parametrize(
    "dtype",
    [np.float16, np.float32, np.float64] + ([] if BF16 is None else [BF16]),
    ids=["f16", "f32", "f64"] + ([] if BF16 is None else ["bf16"]),
)


def forward_both(
    d: dict[str, Any],
    axis: int,
    *,
    affine: bool = True,
    running: bool = True,
    out: bool = False,
    **kw: Any,
) -> list[tuple[np.ndarray, ...]]:
    """The forward through each path, from fresh copies of the running buffers."""
    results = []
    for fast in (True, False):
        F._FAST_PATH = fast
        try:
            rm, rv = d["rm"].copy(), d["rv"].copy()
            buf = np.empty_like(d["x"]) if out else None
            y, mean, invstd = bk.batch_norm_forward(
                d["x"],
                d["g"] if affine else None,
                d["b"] if affine else None,
                running_mean=rm if running else None,
                running_var=rv if running else None,
                axis=axis,
                out=buf,
                **kw,
            )
            if out:
                assert y is buf
            results.append((y, mean, invstd, rm, rv))
        finally:
            F._FAST_PATH = True
    return results


@FAST_DTYPES
def test_plain_calls_take_the_fast_path(dtype):
    d = make((8, 3, 4, 5), 1, dtype)
    for training in (True, False):
        r = _core.forward_fast(
            d["x"], d["g"], d["b"], d["rm"].copy(), d["rv"].copy(), training, 0.1, 1e-5, 1,
            True, None,
        )  # fmt: skip
        assert isinstance(r, tuple) and len(r) == 3
    _, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"])
    for training in (True, False):
        r = _core.backward_fast(d["dy"], d["x"], mean, invstd, d["g"], training, 1, None)
        assert isinstance(r, tuple) and len(r) == 3


@FAST_DTYPES
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_fast_and_checked_paths_agree_bitwise(layout, dtype):
    d = make(layout.shape, layout.axis, dtype)
    ax = layout.axis
    options = [
        {"training": True},
        {"training": True, "affine": False, "running": False},
        {"training": True, "out": True, "momentum": 0.3, "running_var_unbiased": False},
        {"training": False},
        {"training": False, "affine": False, "out": True, "eps": 1e-3},
    ]
    for opt in options:
        fast, checked = forward_both(d, ax, **dict(opt))
        for a, b in zip(fast, checked, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(opt))
            assert a.dtype == b.dtype
    _, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=ax)
    for training in (True, False):
        for gamma in (d["g"], None):
            for with_out in (False, True):
                got = []
                for fast in (True, False):
                    F._FAST_PATH = fast
                    try:
                        out = np.empty_like(d["x"]) if with_out else None
                        r = bk.batch_norm_backward(
                            d["dy"], d["x"], mean, invstd, gamma, training=training, axis=ax,
                            out=out,
                        )  # fmt: skip
                        if with_out:
                            assert r[0] is out
                        got.append(r)
                    finally:
                        F._FAST_PATH = True
                for a, b in zip(*got, strict=True):
                    np.testing.assert_array_equal(a, b)
                    assert a.dtype == b.dtype
                assert got[0][0].dtype == d["x"].dtype
                assert got[0][1].dtype == d["g"].dtype  # dgamma: the parameters' dtype


class Sub(np.ndarray):
    pass


def _shifted_overlap(a: dict[str, Any]) -> None:
    """x and out as views of one buffer, out 3 elements further on: a partial overlap."""
    n = a["x"].size
    buf = np.zeros(n + 3, a["x"].dtype)
    buf[:n] = a["x"].ravel()
    a["x"] = buf[:n].reshape(a["x"].shape)
    a["out"] = buf[3:].reshape(a["x"].shape)


def _forward_args(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "x": d["x"], "gamma": d["g"], "beta": d["b"], "running_mean": d["rm"].copy(),
        "running_var": d["rv"].copy(), "training": True, "momentum": 0.1, "eps": 1.0,
        "axis": 1, "running_var_unbiased": True, "out": None,
    }  # fmt: skip


def each_dtype_and_change(table: list[tuple[str, Any, Any]]) -> Callable[[Any], Any]:
    """Parametrizes a test over both dtypes and every (label, change, valid) row of ``table``."""

    def decorate(test: Any) -> Any:
        test = pytest.mark.parametrize("label,change,valid", table, ids=[c[0] for c in table])(test)
        return pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])(test)

    return decorate


# (label, a change to the plain forward arguments that the fast path must decline, whether the
# public call is still valid: True, False, or "f64" (valid for float64 x only, where the list or
# array given converts to x's dtype))
FORWARD_DECLINED = [
    ("x-subclass", lambda a: a.update(x=a["x"].view(Sub)), True),
    ("x-noncontiguous", lambda a: a.update(x=np.asfortranarray(a["x"])), True),
    ("x-list", lambda a: a.update(x=a["x"].tolist()), "f64"),
    ("x-byteswapped", lambda a: a.update(x=a["x"].astype(a["x"].dtype.newbyteorder())), False),
    ("x-int", lambda a: a.update(x=a["x"].astype(np.int32)), False),
    ("x-1d", lambda a: a.update(x=a["x"].ravel()), False),
    ("x-empty", lambda a: a.update(x=a["x"][:0]), "empty"),
    ("gamma-list", lambda a: a.update(gamma=a["gamma"].tolist()), "f64"),
    ("gamma-strided", lambda a: a.update(gamma=np.repeat(a["gamma"], 2)[::2]), True),
    ("gamma-other-dtype", lambda a: a.update(gamma=a["gamma"].astype(np.float16)), False),
    ("gamma-length", lambda a: a.update(gamma=a["gamma"][:-1]), False),
    ("running-readonly", lambda a: a["running_mean"].setflags(write=False), False),
    ("running-strided", lambda a: a.update(running_var=np.repeat(a["running_var"], 2)[::2]),
     False),
    ("eps-int", lambda a: a.update(eps=1), True),
    ("eps-negative", lambda a: a.update(eps=-1e-5), False),
    ("eps-nan", lambda a: a.update(eps=float("nan")), False),
    ("momentum-numpy", lambda a: a.update(momentum=np.float64(0.1)), True),
    ("momentum-inf", lambda a: a.update(momentum=float("inf")), False),
    ("axis-numpy-int", lambda a: a.update(axis=np.int64(1)), True),
    ("axis-bool", lambda a: a.update(axis=True), False),
    ("axis-out-of-range", lambda a: a.update(axis=4), False),
    ("training-int", lambda a: a.update(training=1), True),
    ("unbiased-int", lambda a: a.update(running_var_unbiased=1), True),
    ("one-value-per-channel", lambda a: a.update(x=a["x"][:1, :, :1, :1]), False),
    ("out-readonly", lambda a: a.update(out=np.empty_like(a["x"])) or a["out"].setflags(
        write=False), False),
    ("out-is-x", lambda a: a.update(out=a["x"]), True),  # in place: the checked path runs it
    ("out-overlaps-x", lambda a: _shifted_overlap(a), False),
    ("out-overlaps-running", lambda a: a.update(
        running_mean=np.empty(a["x"].size, a["x"].dtype)[:3],
        out=np.empty(a["x"].size, a["x"].dtype).reshape(a["x"].shape)) or a.update(
        running_mean=a["out"].reshape(-1)[:3]), False),
    ("out-fortran", lambda a: a.update(out=np.asfortranarray(np.empty_like(a["x"]))), False),
    ("out-other-dtype", lambda a: a.update(out=np.empty(a["x"].shape, np.float16)), False),
    ("infer-without-running", lambda a: a.update(training=False, running_var=None), False),
]  # fmt: skip


@each_dtype_and_change(FORWARD_DECLINED)
def test_forward_declines_what_is_not_plain(label, change, valid, dtype):
    d = make((6, 3, 2, 2), 1, dtype)
    args = _forward_args(d)
    change(args)
    assert _core.forward_fast(*args.values()) is None, label
    if valid == "f64":
        valid = dtype == np.float64
    if valid == "empty":  # taken by the checked path as torch takes it: nothing to compute
        before = args["running_mean"].copy()
        y, m, i = bk.batch_norm_forward(**args)
        assert y.size == 0 and np.isnan(m).all() and np.isnan(i).all()
        np.testing.assert_array_equal(args["running_mean"], before)
    elif valid:
        # the public call goes the checked way and computes what the plain call computes
        ref_args, got_args = _forward_args(d), _forward_args(d)
        change(got_args)
        y_ref, m_ref, i_ref = bk.batch_norm_forward(**{k: ref_args[k] for k in ref_args})
        y, m, i = bk.batch_norm_forward(**{k: got_args[k] for k in got_args})
        np.testing.assert_array_equal(np.asarray(y), y_ref)
        np.testing.assert_array_equal(m, m_ref)
        np.testing.assert_array_equal(i, i_ref)
        if label not in ("momentum-numpy",):
            np.testing.assert_array_equal(got_args["running_mean"], ref_args["running_mean"])
    else:
        with pytest.raises((ValueError, TypeError)):
            bk.batch_norm_forward(**args)


BACKWARD_DECLINED = [
    ("mean-float32", lambda a: a.update(mean=a["mean"].astype(np.float32)), False),
    ("mean-list", lambda a: a.update(mean=a["mean"].tolist()), True),
    ("invstd-strided", lambda a: a.update(invstd=np.repeat(a["invstd"], 2)[::2]), True),
    ("dy-noncontiguous", lambda a: a.update(dy=np.asfortranarray(a["dy"])), True),
    ("dy-shape", lambda a: a.update(dy=a["dy"][:-1]), False),
    ("dy-dtype", lambda a: a.update(dy=a["dy"].astype(np.float16)), False),
    ("training-int", lambda a: a.update(training=1), True),
    ("out-overlaps-dy", lambda a: a.update(out=a["dy"]), False),
    ("mean-length", lambda a: a.update(mean=a["mean"][:-1]), False),
]  # fmt: skip


@each_dtype_and_change(BACKWARD_DECLINED)
def test_backward_declines_what_is_not_plain(label, change, valid, dtype):
    d = make((6, 3, 2, 2), 1, dtype)
    _, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"])

    def plain() -> dict[str, Any]:
        return {"dy": d["dy"], "x": d["x"], "mean": mean, "invstd": invstd, "gamma": d["g"],
                "training": True, "axis": 1, "out": None}  # fmt: skip

    args = plain()
    change(args)
    assert _core.backward_fast(*args.values()) is None, label
    if label == "mean-float32":  # valid, and the same as the float64 mean it rounds to
        want_args = plain()
        want_args["mean"] = mean.astype(np.float32).astype(np.float64)
        for a, b in zip(bk.batch_norm_backward(**args), bk.batch_norm_backward(**want_args),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    elif valid:
        want = bk.batch_norm_backward(**plain())
        got = bk.batch_norm_backward(**args)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        with pytest.raises((ValueError, TypeError)):
            bk.batch_norm_backward(**args)


# float16 data: the parameters and running statistics are float32 (param_dtype); float16 ones
# are refused by the checked path, and bfloat16 data always take it
F16_DECLINED = [
    ("gamma-float16", lambda a: a.update(gamma=a["gamma"].astype(np.float16))),
    ("running-float16", lambda a: a.update(running_mean=a["running_mean"].astype(np.float16))),
    ("out-float32", lambda a: a.update(out=np.empty(a["x"].shape, np.float32))),
]  # fmt: skip


@pytest.mark.parametrize("label,change", F16_DECLINED, ids=[c[0] for c in F16_DECLINED])
def test_float16_forward_declines_other_parameter_dtypes(label, change):
    d = make((6, 3, 2, 2), 1, np.float16)
    args = _forward_args(d)
    assert isinstance(_core.forward_fast(*args.values()), tuple)  # the plain float16 call
    change(args)
    assert _core.forward_fast(*args.values()) is None, label
    with pytest.raises((ValueError, TypeError)):
        bk.batch_norm_forward(**args)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_other_user_dtypes_are_declined():
    """bfloat16 is recognized by its scalar type, ml_dtypes.bfloat16 itself: ml_dtypes' other
    types (user types too, each with a run-time type number) are declined, and the checked path
    refuses them by name."""
    d = make((6, 3, 2, 2), 1, np.float32)
    for other in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        args = _forward_args(d) | {"x": d["x"].astype(other)}
        assert _core.forward_fast(*args.values()) is None
        with pytest.raises(TypeError, match="x"):
            bk.batch_norm_forward(**args)
    # and bfloat16 with float16 parameters is declined like float16 data with them
    args = _forward_args(make((6, 3, 2, 2), 1, BF16))
    assert isinstance(_core.forward_fast(*args.values()), tuple)
    args["gamma"] = args["gamma"].astype(np.float16)
    assert _core.forward_fast(*args.values()) is None


def test_no_reference_is_leaked_or_lost():
    d = make((16, 4), 1, np.float32)
    out = np.empty_like(d["x"])
    rm, rv = d["rm"].copy(), d["rv"].copy()
    watched = [d["x"], d["g"], d["b"], rm, rv, out, d["dy"]]
    before = [sys.getrefcount(a) for a in watched]
    for _ in range(1000):
        y, mean, invstd = bk.batch_norm_forward(
            d["x"], d["g"], d["b"], running_mean=rm, running_var=rv, out=out
        )
        bk.batch_norm_forward(d["x"], d["g"], d["b"], running_mean=rm, running_var=rv,
                              training=False)  # fmt: skip
        dx, _, _ = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], out=out)
    del y, dx
    assert [sys.getrefcount(a) for a in watched] == before
    # the fresh outputs are owned by the caller alone
    _, mean, invstd = bk.batch_norm_forward(d["x"])
    assert sys.getrefcount(mean) == 2 and sys.getrefcount(invstd) == 2
