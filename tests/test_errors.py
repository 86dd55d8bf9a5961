"""Every bad argument raises a clear exception whose message names the argument, before any kernel
runs (so nothing is half-updated); and the valid edge cases next to them work."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from numpy.exceptions import AxisError

import bnkernel as bk

C = 3


def params(x, dtype=None):
    """Valid per-channel arguments for x (C = 3 when x's channel count cannot be read)."""
    dt = (
        np.dtype(dtype)
        if dtype is not None
        else (
            x.dtype
            if isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64)
            else np.dtype(np.float32)
        )
    )
    return {
        "gamma": np.ones(C, dt),
        "beta": np.zeros(C, dt),
        "running_mean": np.zeros(C, dt),
        "running_var": np.ones(C, dt),
        "mean": np.zeros(C),
        "invstd": np.ones(C),
        "sum_dy": np.zeros(C),
        "sum_dy_xhat": np.zeros(C),
    }


def call(op, x, dy=None, axis=1, out=None, **kw):
    """Call op with valid arguments for a (.., C=3, ..) x, overridden by kw."""
    p = params(x)
    p.update(kw)
    dy = x if dy is None else dy
    eps = p.pop("eps", 1e-5)
    outkw = {} if out is None else {"out": out}
    if op in ("forward_train", "forward_infer"):
        return bk.batch_norm_forward(
            x,
            p["gamma"],
            p["beta"],
            running_mean=p["running_mean"],
            running_var=p["running_var"],
            training=op == "forward_train",
            momentum=p.get("momentum", 0.1),
            eps=eps,
            axis=axis,
            **outkw,
        )
    if op in ("backward_train", "backward_frozen"):
        return bk.batch_norm_backward(
            dy,
            x,
            p["mean"],
            p["invstd"],
            p["gamma"],
            training=op == "backward_train",
            axis=axis,
            **outkw,
        )
    if op == "channel_stats":
        return bk.channel_stats(x, axis=axis)
    if op == "normalize":
        return bk.normalize(x, p["mean"], p["invstd"], p["gamma"], p["beta"], axis=axis, **outkw)
    if op == "backward_reduce":
        return bk.backward_reduce(dy, x, p["mean"], p["invstd"], axis=axis)
    if op == "backward_elementwise":
        return bk.backward_elementwise(
            dy,
            x,
            p["mean"],
            p["invstd"],
            p["gamma"],
            p["sum_dy"],
            p["sum_dy_xhat"],
            p.get("count", 8),
            axis=axis,
            **outkw,
        )
    raise AssertionError(op)


OPS = [
    "forward_train",
    "forward_infer",
    "backward_train",
    "backward_frozen",
    "channel_stats",
    "normalize",
    "backward_reduce",
    "backward_elementwise",
]
OPS_WITH_DY = ["backward_train", "backward_frozen", "backward_reduce", "backward_elementwise"]
# the ops that write an array of x's shape: they take out=, and gamma (that array's scale); the
# other two (channel_stats, backward_reduce) return per-channel sums and take neither
OPS_WITH_OUT = [
    "forward_train",
    "forward_infer",
    "backward_train",
    "backward_frozen",
    "normalize",
    "backward_elementwise",
]
OPS_WITH_GAMMA = OPS_WITH_OUT
OPS_WITH_BETA = ["forward_train", "forward_infer", "normalize"]
OPS_WITH_SAVED_STATS = [
    "backward_train",
    "backward_frozen",
    "normalize",
    "backward_reduce",
    "backward_elementwise",
]
SPLIT_OPS = ["channel_stats", "normalize", "backward_reduce", "backward_elementwise"]


def x32(shape=(4, C, 2)):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_valid_calls_work():
    """The baseline every error test perturbs: with these arguments, every op succeeds."""
    for op in OPS:
        call(op, x32())
        call(op, x32((5, 2, C)), axis=-1)


# ---- x: ndim, dtype, axis -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.float32(1.0), np.ones(3, np.float32)], ids=["0-d", "1-d"])
@pytest.mark.parametrize("op", OPS)
def test_x_ndim_below_2(op, bad):
    with pytest.raises(ValueError, match=r"^x: expected an array with ndim >= 2"):
        call(op, np.asarray(bad), axis=0)


@pytest.mark.parametrize("op", OPS_WITH_DY)
def test_dy_ndim_below_2(op):
    with pytest.raises(ValueError, match=r"^dy: expected an array with ndim >= 2"):
        call(op, x32(), dy=np.ones(3, np.float32))


# (uint16 and a 2-byte void dtype: the same size as the 16-bit float dtypes, which are supported)
BAD_DTYPES = [np.int32, np.int64, np.complex64, object, np.uint16, np.dtype("V2"), np.bool_]
DATA = "a float16, bfloat16, float32 or float64 array"
BAD_DTYPE_IDS = ["int32", "int64", "complex64", "object", "uint16", "void16", "bool"]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=BAD_DTYPE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_x_unsupported_dtype(op, dtype):
    x = np.ones((4, C, 2), dtype=dtype)
    with pytest.raises(
        TypeError, match=r"^x: expected a float16, bfloat16, float32 or float64 array, got dtype"
    ):
        call(op, x, dy=np.ones((4, C, 2), np.float32))


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=BAD_DTYPE_IDS)
@pytest.mark.parametrize("op", OPS_WITH_DY)
def test_dy_unsupported_dtype(op, dtype):
    with pytest.raises(
        TypeError, match=r"^dy: expected a float16, bfloat16, float32 or float64 array"
    ):
        call(op, x32(), dy=np.ones((4, C, 2), dtype=dtype))


@pytest.mark.parametrize("axis", [3, -4, 100])
@pytest.mark.parametrize("op", OPS)
def test_axis_out_of_range(op, axis):
    with pytest.raises(AxisError, match=r"axis"):
        call(op, x32(), axis=axis)


@pytest.mark.parametrize(
    "axis",
    [1.0, "1", None, True, np.float64(1)],
    ids=["float", "str", "None", "bool", "np.float64"],
)
@pytest.mark.parametrize("op", OPS)
def test_axis_not_an_int(op, axis):
    with pytest.raises(TypeError, match=r"^axis: expected an int"):
        call(op, x32(), axis=axis)


@pytest.mark.parametrize(
    "axis", [np.int64(1), np.int32(-2), 1, -2], ids=["i64", "i32", "int", "neg"]
)
def test_numpy_integer_axis_accepted(axis):
    y, _, _ = bk.batch_norm_forward(x32(), axis=axis)
    y1, _, _ = bk.batch_norm_forward(x32(), axis=1)
    np.testing.assert_array_equal(y, y1)


# ---- per-channel arguments ----------------------------------------------------------------------

BAD_PARAMS = {
    "wrong-length": (
        lambda dt: np.ones(C + 1, dt),
        ValueError,
        r"expected shape \(3,\), got \(4,\)",
    ),
    "2-D": (lambda dt: np.ones((1, C), dt), ValueError, r"expected shape \(3,\), got \(1, 3\)"),
    "f64-for-f32-x": (
        lambda dt: np.ones(C, np.float64),
        TypeError,
        r"expected dtype float32 \(the dtype of x\), got float64",
    ),
}


def param_cases(name, ops):
    return [
        pytest.param(op, name, kind, id=f"{op}-{name}-{kind}") for op in ops for kind in BAD_PARAMS
    ]


@pytest.mark.parametrize(
    "op,name,kind",
    param_cases("gamma", OPS_WITH_GAMMA)
    + param_cases("beta", OPS_WITH_BETA)
    + param_cases("running_mean", ["forward_train", "forward_infer"])
    + param_cases("running_var", ["forward_train", "forward_infer"]),
)
def test_bad_per_channel_argument(op, name, kind):
    make, exc, msg = BAD_PARAMS[kind]
    with pytest.raises(exc, match=rf"^{name}: {msg}"):
        call(op, x32(), **{name: make(np.float32)})


@pytest.mark.parametrize("op", OPS_WITH_GAMMA)
def test_float32_gamma_for_float64_x(op):
    with pytest.raises(TypeError, match=r"^gamma: expected dtype float64"):
        call(op, x32().astype(np.float64), gamma=np.ones(C, np.float32))


SAVED = {
    "wrong-length": (np.zeros(C + 1), ValueError, r"expected shape \(3,\), got \(4,\)"),
    "2-D": (np.zeros((C, 1)), ValueError, r"expected shape \(3,\), got \(3, 1\)"),
    "int": (np.zeros(C, np.int64), TypeError, r"expected a float32 or float64 array"),
    "None": (None, TypeError, r"required, got None"),
}


@pytest.mark.parametrize("kind", list(SAVED))
@pytest.mark.parametrize(
    "op,name",
    [(op, n) for op in OPS_WITH_SAVED_STATS for n in ("mean", "invstd")]
    + [("backward_elementwise", "sum_dy"), ("backward_elementwise", "sum_dy_xhat")],
)
def test_bad_saved_statistic(op, name, kind):
    value, exc, msg = SAVED[kind]
    with pytest.raises(exc, match=rf"^{name}: {msg}"):
        call(op, x32(), **{name: value})


# ---- dy against x -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS_WITH_DY)
def test_dy_shape_mismatch(op):
    with pytest.raises(
        ValueError, match=r"^dy: expected the shape of x \(4, 3, 2\), got \(4, 3, 3\)"
    ):
        call(op, x32(), dy=x32((4, C, 3)))


@pytest.mark.parametrize("op", OPS_WITH_DY)
def test_dy_dtype_mismatch(op):
    with pytest.raises(
        TypeError, match=r"^dy: expected dtype float32 \(the dtype of x\), got float64"
    ):
        call(op, x32(), dy=x32().astype(np.float64))


# ---- one value per channel, empty arrays --------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis",
    [((1, C), 1), ((1, C, 1, 1), 1), ((1, 1, 1, C), -1)],
    ids=["1xC", "1xCx1x1", "1x1x1xC"],
)
@pytest.mark.parametrize("op", ["forward_train", "backward_train"])
def test_training_with_one_value_per_channel(op, shape, axis):
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    with pytest.raises(
        ValueError, match=r"^x: expected more than 1 value per channel when training"
    ):
        call(op, x32(shape), axis=axis, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, np.zeros(C))  # nothing updated
    np.testing.assert_array_equal(rv, np.ones(C))
    # the same data are fine in inference / frozen mode
    call("forward_infer" if op == "forward_train" else "backward_frozen", x32(shape), axis=axis)


@pytest.mark.parametrize(
    "op", ["forward_train", "forward_infer", "backward_train", "backward_frozen"]
)
def test_empty_batch_is_taken_by_fused_ops(op):
    """N = 0, as torch takes it: an empty output, no running update, zero gradients (the layer's
    scenario against torch itself is in tests/test_torch.py)."""
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    result = call(op, np.zeros((0, C), np.float32), running_mean=rm, running_var=rv)
    out = result if isinstance(result, np.ndarray) else result[0]
    assert out.shape == (0, C)
    assert (rm == 0.5).all() and (rv == 2.0).all()
    if op.startswith("backward"):
        assert not result[1].any() and not result[2].any()
    elif op == "forward_train":
        assert np.isnan(result[1]).all() and np.isnan(result[2]).all()


@pytest.mark.parametrize(
    "shape,axis", [((4, 0, 2), 1), ((4, 2, 0), -1), ((0, 0), 1)], ids=["Nx0xL", "NxLx0-last", "0x0"]
)
@pytest.mark.parametrize("op", OPS)
def test_zero_channels_rejected(op, shape, axis):
    with pytest.raises(ValueError, match=r"^x: (expected a non-empty array|the channel axis)"):
        call(op, np.zeros(shape, np.float32), axis=axis)


@pytest.mark.parametrize("op", SPLIT_OPS)
def test_zero_channels_message_names_the_axis(op):
    with pytest.raises(ValueError, match=r"^x: the channel axis 1 has length 0"):
        call(op, np.zeros((4, 0, 2), np.float32))


# ---- out= ---------------------------------------------------------------------------------------


def overlapping_view(x):
    """A C-contiguous array of x's shape and dtype that shares memory with x without being x."""
    buf = np.zeros(2 * x.size, x.dtype)
    xv = buf[: x.size].reshape(x.shape)
    xv[...] = x
    return xv, buf[x.size // 2 : x.size // 2 + x.size].reshape(x.shape)


BAD_OUT = {
    "read-only": (ValueError, r"^out: is read-only"),
    "wrong-dtype": (TypeError, r"^out: expected dtype float32, got float64"),
    "wrong-shape": (ValueError, r"^out: expected shape \(4, 3, 2\), got \(4, 3, 3\)"),
    "non-contiguous": (ValueError, r"^out: must be C-contiguous"),
    "fortran-order": (ValueError, r"^out: must be C-contiguous"),
    "is-x": (ValueError, r"^out: overlaps an input array"),
    "view-overlapping-x": (ValueError, r"^out: overlaps an input array"),
    "is-dy": (ValueError, r"^out: overlaps an input array"),
    "overlaps-gamma": (ValueError, r"^out: overlaps an input array"),
    "list": (
        TypeError,
        r"^out: expected a NumPy array, a DLPack array in host memory \(a torch CPU tensor\) or a "
        r"CUDA device array \(it is written\), got list",
    ),
}


@pytest.mark.parametrize(
    "op,kind",
    [
        pytest.param(op, kind, id=f"{op}-{kind}")
        for op in OPS_WITH_OUT
        for kind in BAD_OUT
        if (kind != "is-dy" or op in OPS_WITH_DY)
        # out=x itself is the in-place forward, allowed for the ops without dy
        # (tests/test_variants.py); the backward ops must still refuse it
        and (kind != "is-x" or op in OPS_WITH_DY)
    ],
)
def test_bad_out(op, kind):
    x = x32()
    dy = x32() * 2
    kw = {}
    exc, msg = BAD_OUT[kind]
    if kind == "read-only":
        out = np.empty_like(x)
        out.flags.writeable = False
    elif kind == "wrong-dtype":
        out = np.empty(x.shape, np.float64)
    elif kind == "wrong-shape":
        out = np.empty((4, C, 3), np.float32)
    elif kind == "non-contiguous":
        out = np.empty((4, C, 4), np.float32)[:, :, ::2]
    elif kind == "fortran-order":
        out = np.empty(x.shape, np.float32, order="F")
    elif kind == "is-x":
        out = x
    elif kind == "view-overlapping-x":
        x, out = overlapping_view(x)
    elif kind == "is-dy":
        out = dy
    elif kind == "overlaps-gamma":
        buf = np.ones(x.size, np.float32)
        out = buf.reshape(x.shape)
        kw["gamma"] = buf[:C]
    else:
        out = np.zeros(x.shape).tolist()
    before = np.array(out, copy=True)
    with pytest.raises(exc, match=msg):
        call(op, x, dy=dy, out=out, **kw)
    np.testing.assert_array_equal(np.asarray(out), before)  # the failed call wrote nothing


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape,axis", [((4, C, 5), 1), ((4, 5, C), -1), ((16, C), 1)], ids=["NCL", "NLC", "NC"]
)
@pytest.mark.parametrize("op", OPS_WITH_OUT)
def test_valid_out_is_written_in_place(op, shape, axis, dtype):
    x = x32(shape).astype(dtype)
    dy = (x32(shape) * 2 + 1).astype(dtype)
    out = np.full(shape, np.nan, dtype)
    kw = {
        "gamma": np.linspace(0.5, 1.5, C).astype(dtype),
        "beta": np.arange(C).astype(dtype),
        "running_mean": np.ones(C, dtype),
        "running_var": np.full(C, 2.0, dtype),
    }
    with_out = call(op, x, dy=dy, axis=axis, out=out, **kw)
    kw["running_mean"], kw["running_var"] = np.ones(C, dtype), np.full(C, 2.0, dtype)
    without = call(op, x, dy=dy, axis=axis, **kw)
    with_out = with_out if isinstance(with_out, np.ndarray) else with_out[0]
    without = without if isinstance(without, np.ndarray) else without[0]
    assert with_out is out
    np.testing.assert_array_equal(out, without)


# ---- running statistics -------------------------------------------------------------------------


def _readonly(a):
    a.flags.writeable = False
    return a


BAD_RUNNING = {
    "read-only": (lambda: _readonly(np.zeros(C, np.float32)), ValueError, r"is read-only"),
    "non-contiguous": (lambda: np.zeros(2 * C, np.float32)[::2], ValueError, r"must be contiguous"),
    "list": (
        lambda: [0.0] * C,
        TypeError,
        r"expected a NumPy array, a DLPack array .* \(it is updated in place\)",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_RUNNING))
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_bad_running_buffer_in_training(name, kind):
    make, exc, msg = BAD_RUNNING[kind]
    other = "running_var" if name == "running_mean" else "running_mean"
    good = np.full(C, 5.0, np.float32)
    with pytest.raises(exc, match=rf"^{name}: {msg}"):
        call("forward_train", x32(), **{name: make(), other: good})
    np.testing.assert_array_equal(good, np.full(C, 5.0))  # the valid one was not updated either


@pytest.mark.parametrize("kind", ["read-only", "non-contiguous"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_bad_running_buffer_in_update_running_stats(name, kind):
    make, exc, msg = BAD_RUNNING[kind]
    bufs = {"running_mean": np.zeros(C, np.float32), "running_var": np.ones(C, np.float32)}
    bufs[name] = make()
    with pytest.raises(exc, match=rf"^{name}: {msg}"):
        bk.update_running_stats(
            bufs["running_mean"], bufs["running_var"], 8, np.zeros(C), np.ones(C)
        )


def test_running_stats_may_be_readonly_or_lists_in_inference():
    """In inference the running statistics are only read: any array-like of x's dtype will do."""
    rm = _readonly(np.zeros(C, np.float32))
    rv = np.ones(2 * C, np.float32)[::2]
    call("forward_infer", x32(), running_mean=rm, running_var=rv)


@pytest.mark.parametrize("missing", ["both", "running_mean", "running_var"])
def test_inference_needs_running_statistics(missing):
    rm = None if missing in ("both", "running_mean") else np.zeros(C, np.float32)
    rv = None if missing in ("both", "running_var") else np.ones(C, np.float32)
    with pytest.raises(ValueError, match=r"^running_mean, running_var: both are required"):
        bk.batch_norm_forward(x32(), running_mean=rm, running_var=rv, training=False)


# ---- eps, momentum ------------------------------------------------------------------------------

BAD_NUMBERS = [
    pytest.param(-1e-5, ValueError, r"expected a number >= 0.0, got -1e-05", id="negative"),
    pytest.param(float("nan"), ValueError, r"expected a finite number", id="nan"),
    pytest.param(float("inf"), ValueError, r"expected a finite number", id="inf"),
    pytest.param("1e-5", TypeError, r"expected a real number, got str", id="str"),
    pytest.param(None, TypeError, r"expected a real number, got NoneType", id="None"),
]


@pytest.mark.parametrize("value,exc,msg", BAD_NUMBERS)
@pytest.mark.parametrize("op", ["forward_train", "forward_infer", "invstd_from_stats"])
def test_bad_eps(op, value, exc, msg):
    with pytest.raises(exc, match=rf"^eps: {msg}"):
        if op == "invstd_from_stats":
            bk.invstd_from_stats(4, np.ones(C), value)
        else:
            call(op, x32(), eps=value)


@pytest.mark.parametrize("value,exc,msg", [p for p in BAD_NUMBERS if p.id != "negative"])
@pytest.mark.parametrize("op", ["forward_train", "update_running_stats"])
def test_bad_momentum(op, value, exc, msg):
    with pytest.raises(exc, match=rf"^momentum: {msg}"):
        if op == "update_running_stats":
            bk.update_running_stats(
                np.zeros(C), np.ones(C), 4, np.zeros(C), np.ones(C), momentum=value
            )
        else:
            call(op, x32(), momentum=value)


def test_eps_zero_is_allowed():
    y, _, invstd = bk.batch_norm_forward(np.array([[1.0], [3.0]]), eps=0)
    np.testing.assert_array_equal(invstd, [1.0])
    np.testing.assert_array_equal(y, [[-1.0], [1.0]])


# ---- merge_stats, invstd_from_stats, backward_elementwise counts --------------------------------

GOOD = (4, np.zeros(C), np.ones(C))


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        pytest.param(
            (), ValueError, r"^merge_stats: expected at least one \(count, mean, M2\)", id="no-args"
        ),
        pytest.param(
            ([4, np.zeros(C), np.ones(C)],),
            TypeError,
            r"^stats\[0\]: expected a \(count, mean, M2\) tuple",
            id="list-not-tuple",
        ),
        pytest.param(
            (GOOD, (4, np.zeros(C))),
            TypeError,
            r"^stats\[1\]: expected a \(count, mean, M2\) tuple",
            id="2-tuple",
        ),
        pytest.param(
            ((*GOOD, 1),), TypeError, r"^stats\[0\]: expected a \(count, mean, M2\)", id="4-tuple"
        ),
        pytest.param(
            (GOOD, (-1, np.zeros(C), np.ones(C))),
            ValueError,
            r"^stats\[1\]: count must be an int >= 0, got -1",
            id="negative-count",
        ),
        pytest.param(
            ((2.0, np.zeros(C), np.ones(C)),),
            ValueError,
            r"^stats\[0\]: count must be an int >= 0, got 2.0",
            id="float-count",
        ),
        pytest.param(
            ((True, np.zeros(C), np.ones(C)),),
            ValueError,
            r"^stats\[0\]: count must be an int >= 0, got True",
            id="bool-count",
        ),
        pytest.param(
            ((None, np.zeros(C), np.ones(C)),),
            ValueError,
            r"^stats\[0\]: count must be an int",
            id="None-count",
        ),
        pytest.param(
            (GOOD, (4, np.zeros(C + 1), np.ones(C + 1))),
            ValueError,
            r"^stats\[1\] mean: expected shape \(3,\), got \(4,\)",
            id="channel-mismatch",
        ),
        pytest.param(
            ((4, np.zeros(C), np.ones(C + 1)),),
            ValueError,
            r"^stats\[0\] M2: expected shape \(3,\), got \(4,\)",
            id="M2-length",
        ),
        pytest.param(
            (GOOD, (4, np.zeros((1, C)), np.ones(C))),
            ValueError,
            r"^stats\[1\] mean: expected shape \(3,\)",
            id="2-D-mean",
        ),
        pytest.param(
            ((4, np.zeros(C, np.int64), np.ones(C)),),
            TypeError,
            r"^stats\[0\] mean: expected a float32 or float64 array",
            id="int-mean",
        ),
        pytest.param(
            ((4, np.zeros(C), None),), TypeError, r"^stats\[0\] M2: required", id="None-M2"
        ),
    ],
)
def test_merge_stats_bad_arguments(args, exc, msg):
    with pytest.raises(exc, match=msg):
        bk.merge_stats(*args)


@pytest.mark.parametrize(
    "count", [0, -1, 2.5, True, None, "4"], ids=["0", "negative", "float", "bool", "None", "str"]
)
def test_invstd_from_stats_bad_count(count):
    with pytest.raises(ValueError, match=r"^count: expected an int >= 1"):
        bk.invstd_from_stats(count, np.ones(C))


@pytest.mark.parametrize("count", [0, -3, 1.5, True], ids=["0", "negative", "float", "bool"])
def test_backward_elementwise_bad_count(count):
    dx = np.zeros((4, C, 2), np.float32)
    with pytest.raises(ValueError, match=r"^count: expected an int >= 1"):
        call("backward_elementwise", x32(), count=count, out=dx)
    assert not dx.any()


# ---- update_running_stats: the same argument checks as its siblings ----------------------------


def test_update_running_stats_rejects_a_list():
    with pytest.raises(TypeError, match=r"^running_mean: expected a NumPy array"):
        bk.update_running_stats([0.0] * C, np.ones(C), 8, np.zeros(C), np.ones(C))


@pytest.mark.parametrize("count", [0, -2], ids=["0", "negative"])
def test_update_running_stats_rejects_a_bad_count(count):
    rv = np.ones(C)
    with pytest.raises(ValueError, match=r"^count: expected an int >= 1"):
        bk.update_running_stats(None, rv, count, np.zeros(C), np.ones(C))
    np.testing.assert_array_equal(rv, np.ones(C))


def test_update_running_stats_rejects_m2_of_the_wrong_length():
    rv = np.ones(C)
    with pytest.raises(ValueError, match=r"^m2: expected shape \(3,\)"):
        bk.update_running_stats(np.zeros(C), rv, 8, np.zeros(C), np.ones(1))
    np.testing.assert_array_equal(rv, np.ones(C))


def test_update_running_stats_rejects_integer_buffers():
    rm = np.zeros(C, np.int32)
    with pytest.raises(TypeError, match=r"^running_mean: expected a float32 or float64 array"):
        bk.update_running_stats(rm, None, 8, np.full(C, 0.5), np.ones(C), momentum=1.0)


def test_set_num_threads_rejects_bad_values():
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"^n: expected an int >= 0 or None"):
            bk.set_num_threads(bad)


# ---- allocation failures inside parallel regions -------------------------------------------------

FAIL_SCRIPT = r"""
import sys, numpy as np, bnkernel as bk
from bnkernel import reference as ref
bk.set_num_threads(3)
op = sys.argv[1]
rng = np.random.default_rng(0)
shapes = {
    "planar-shared": ((2, 3, 40000), 1),     # few channels: the threads share each channel's tree
    "planar-channels": ((4, 16, 4096), 1),   # a channel per thread, fused forward / backward
    "interleaved-windows": ((40, 5000), 1),  # C > 2048: windows of columns, one tree per window
}
shape, axis = shapes[op.split(":")[0]]
x = rng.standard_normal(shape)
dy = rng.standard_normal(shape)
def run():
    if op.endswith(":backward"):
        _, mean, invstd = bk.batch_norm_forward(x, axis=axis)
        return bk.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0], ref.backward_train(
            dy, x, *ref.forward_train(x, None, None, 1e-5, axis)[1:], None, axis)[0]
    return bk.batch_norm_forward(x, axis=axis)[0], ref.forward_train(x, None, None, 1e-5, axis)[0]
# The injection fails one allocation, the n-th; which call makes it depends on how the threads
# were scheduled (a thread that got no work in one call allocates its scratch in a later one), so
# the script calls until the kernels are warm and one call allocates nothing.  At most one call
# raises, and every call after it works and is right.
outcome = "ok"
for _ in range(50):
    before = bk._core.workspace_allocations()
    try:
        got, want = run()
    except MemoryError:
        assert outcome == "ok", "a second MemoryError: the injection fails one allocation"
        outcome = "MemoryError"
        continue
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    if bk._core.workspace_allocations() == before:
        break
else:
    raise AssertionError("the kernels kept allocating")
print(outcome)
"""


@pytest.mark.parametrize(
    "op",
    ["planar-shared:forward", "planar-shared:backward", "planar-channels:forward",
     "planar-channels:backward", "interleaved-windows:forward", "interleaved-windows:backward"],
)  # fmt: skip
def test_allocation_failure_in_a_parallel_region_is_a_memory_error(op):
    """BNKERNEL_TEST_FAIL_ALLOC=n makes the kernels' n-th scratch allocation throw std::bad_alloc,
    which inside an OpenMP region would terminate the process; it must come out as a MemoryError
    (every n from the first allocation to past the last), and the module must keep working."""
    import os
    import subprocess
    import sys

    outcomes = []
    for n in range(1, 9):
        env = {**os.environ, "BNKERNEL_TEST_FAIL_ALLOC": str(n)}
        proc = subprocess.run([sys.executable, "-c", FAIL_SCRIPT, op], capture_output=True,
                              text=True, env=env, timeout=120)  # fmt: skip
        assert proc.returncode == 0, f"n={n}: {proc.stderr[-2000:]}"
        outcomes.append(proc.stdout.strip())
    assert "MemoryError" in outcomes, outcomes  # the injection reached this op's allocations


# ---- arrays in GPU memory ------------------------------------------------------------------------


class _CudaArray:
    """What CuPy, torch CUDA tensors and Numba device arrays expose (the data pointer is never
    read here)."""

    def __init__(self, shape, typestr="<f4"):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (0, False), "version": 3,
        }  # fmt: skip

    def __array__(self, *args, **kwargs):  # CuPy refuses an implicit copy to the host like this
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


class _DLPackArray:
    """A DLPack exporter on the given device type (2: CUDA, 1: CPU)."""

    def __init__(self, a, device_type):
        self._a, self._device = a, device_type

    def __dlpack_device__(self):
        return (self._device, 0)

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __array__(self, dtype=None, copy=None):
        if self._device != 1:
            raise TypeError("not in host memory")
        return self._a


@pytest.mark.parametrize("where", ["x", "gamma", "running_mean", "out"])
def test_cuda_arrays_without_cupy_say_what_to_install(where, monkeypatch):
    """Without CuPy, a GPU array gets an ImportError naming the argument and the extra to install
    (not NumPy's object-dtype message, nor CuPy's implicit-conversion one).  (tests/test_device.py
    runs the device path itself.)"""
    monkeypatch.setitem(sys.modules, "cupy", None)  # (import cupy raises ImportError)
    x = np.ones((4, 3), np.float32)
    args = {"x": x, "gamma": np.ones(3, np.float32), "running_mean": np.zeros(3, np.float32),
            "running_var": np.ones(3, np.float32), "out": None}  # fmt: skip
    args[where] = _CudaArray((4, 3) if where in ("x", "out") else (3,))
    with pytest.raises(ImportError, match=rf"^{where}: arrays in GPU memory need CuPy: pip "
                       r"install 'bnkernel\[cuda\]'"):  # fmt: skip
        bk.batch_norm_forward(
            args["x"], args["gamma"], running_mean=args["running_mean"],
            running_var=args["running_var"], out=args["out"],
        )  # fmt: skip


def test_cuda_arrays_without_cupy_in_the_backward_and_the_layer(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    _, mean, invstd = bk.batch_norm_forward(x)
    with pytest.raises(ImportError, match=r"^dy: arrays in GPU memory need CuPy"):
        bk.batch_norm_backward(_CudaArray((4, 3)), x, mean, invstd)
    with pytest.raises(ImportError, match=r"^x: arrays in GPU memory need CuPy"):
        bk.BatchNorm(3).forward(_CudaArray((4, 3)))


def test_dlpack_arrays_on_a_gpu_are_refused_and_on_the_cpu_taken():
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    with pytest.raises(TypeError, match=r"^x: an array on DLPack device type 8 .* is not taken"):
        bk.batch_norm_forward(_DLPackArray(x, 8))  # (kDLMetal: no kernels for it)
    y, _, _ = bk.batch_norm_forward(_DLPackArray(x, 1))
    want, _, _ = bk.batch_norm_forward(x)
    assert np.array_equal(y, want)
