"""The one argument layer (bnkernel/_checks.py) under abuse: every case here was accepted (or
crashed) before it, and each public function now refuses it with a clear exception, before anything
is written, or handles it without losing a write.

* overlap: an output shares memory with no other argument; an updated running statistic shares
  memory with no other argument (the in-place forward, ``out`` is ``x``, is the one exception);
* scalars: ``training`` must be a truth value, ``momentum`` in [0, 1] for the functional API too;
* ``np.ma.MaskedArray`` is refused (its mask would be dropped), other subclasses work;
* unaligned arrays: read through an aligned copy, written through an aligned scratch array;
* NaN padding never reaches the valid positions' gradients;
* ``load_state_dict`` checks everything before it writes anything;
* ``merge_stats`` refuses a total count that overflows.

Every refusal is checked on both paths (the compiled fast path on and off), and every array the
call could have written is compared with a copy taken before it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import functional as F
from bnkernel import reference as ref

C = 4


@pytest.fixture(params=[True, False], ids=["fast", "checked"])
def path(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Runs a test with the compiled fast path on and then off."""
    F._FAST_PATH = request.param
    try:
        yield request.param
    finally:
        F._FAST_PATH = True


def data(shape: tuple[int, ...] = (6, C), dtype: Any = np.float64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def refused(fn: Callable[[], Any], arrays: list[np.ndarray], match: str) -> None:
    """fn() raises ValueError matching `match`, and no array in `arrays` changed."""
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=match):
        fn()
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- overlap: the cases -----------------------------------------------------------------


def test_backward_mean_inside_out(path: bool) -> None:
    x, dy = data(), data(seed=1)
    _, mean, invstd = bk.batch_norm_forward(x)
    out = np.zeros_like(x)
    out[0] = mean  # the caller keeps mean in out's first row
    refused(
        lambda: bk.batch_norm_backward(dy, x, out[0], invstd, out=out),
        [out],
        r"^out: overlaps an input array \(mean, a saved statistic\)",
    )


def test_backward_invstd_inside_out(path: bool) -> None:
    x, dy = data(), data(seed=1)
    _, mean, invstd = bk.batch_norm_forward(x)
    out = np.zeros_like(x)
    out[1] = invstd
    refused(lambda: bk.batch_norm_backward(dy, x, mean, out[1], out=out), [out],
            r"^out: overlaps an input array \(invstd")  # fmt: skip


def test_normalize_mean_inside_out() -> None:
    x = data()
    _, mean, invstd = bk.batch_norm_forward(x)
    out = np.zeros_like(x)
    out[0] = mean
    refused(lambda: bk.normalize(x, out[0], invstd, out=out), [out],
            r"^out: overlaps an input array \(mean")  # fmt: skip


@pytest.mark.parametrize("where", ["running_mean", "beta"])
def test_renorm_forward_statistic_inside_out(where: str) -> None:
    x = data()
    out = np.zeros_like(x)
    rm, rv, beta = np.zeros(C), np.ones(C), np.zeros(C)
    kw = {"running_mean": rm, "running_var": rv}
    if where == "running_mean":
        kw["running_mean"] = out[0]
    else:
        beta = out[1]
    refused(lambda: bk.batch_renorm_forward(x, None, beta, out=out, **kw), [out, rm, rv],
            r"^(out|running_mean): overlaps")  # fmt: skip


def test_masked_forward_running_mean_inside_out() -> None:
    x = data()
    mask = np.ones(x.shape[0], bool)
    out = np.zeros_like(x)
    rv = np.ones(C)
    refused(
        lambda: bk.batch_norm_forward(x, running_mean=out[0], running_var=rv, mask=mask, out=out),
        [out, rv],
        r"^(out|running_mean): overlaps",
    )


def test_running_mean_is_running_var(path: bool) -> None:
    x = data()
    r = np.ones(C)
    refused(lambda: bk.batch_norm_forward(x, running_mean=r, running_var=r), [r],
            r"^running_mean: overlaps running_var \(a running statistic\)")  # fmt: skip


def test_running_mean_is_gamma(path: bool) -> None:
    x = data()
    g = np.ones(C)
    rv = np.ones(C)
    refused(lambda: bk.batch_norm_forward(x, g, running_mean=g, running_var=rv), [g, rv],
            r"^running_mean: overlaps gamma \(a parameter\)")  # fmt: skip


def test_running_mean_is_a_row_of_x(path: bool) -> None:
    x = data()
    rv = np.ones(C)
    refused(lambda: bk.batch_norm_forward(x, running_mean=x[0], running_var=rv), [x, rv],
            r"^running_mean: overlaps x \(an input\)")  # fmt: skip


def test_running_statistics_overlapping_partially() -> None:
    buf = np.ones(C + 1)
    x = data()
    refused(lambda: bk.batch_norm_forward(x, running_mean=buf[:C], running_var=buf[1:]), [buf],
            r"^running_mean: overlaps running_var")  # fmt: skip


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, rm, rv: bk.ghost_batch_norm_forward(x, virtual_batch_size=3, running_mean=rm,
                                                      running_var=rv),
        lambda x, rm, rv: bk.batch_renorm_forward(x, running_mean=rm, running_var=rv),
        lambda x, rm, rv: bk.update_running_stats(rm, rv, 6, np.zeros(C), np.ones(C)),
        lambda x, rm, rv: bk.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                                mask=np.ones(6, bool)),
    ],
    ids=["ghost", "renorm", "update_running_stats", "masked"],
)  # fmt: skip
def test_every_running_update_refuses_shared_statistics(fn: Any) -> None:
    x = data()
    r = np.ones(C)
    refused(lambda: fn(x, r, r), [r], r"^running_mean: overlaps running_var")


def test_update_running_stats_refuses_mean_inside_a_running_statistic() -> None:
    rm, rv = np.zeros(C), np.ones(C)
    refused(lambda: bk.update_running_stats(rm, rv, 6, rm, np.ones(C)), [rm, rv],
            r"^running_mean: overlaps mean \(a saved statistic\)")  # fmt: skip


def test_backward_reduce_dresidual_overlapping_dy() -> None:
    x, dy = data(), data(seed=1)
    y, mean, invstd = bk.batch_norm_forward(x, activation="relu")
    refused(lambda: bk.backward_reduce(dy, x, mean, invstd, y=y, dresidual=dy), [dy],
            r"^dresidual: overlaps an input array \(dy")  # fmt: skip


def test_in_place_forward_still_allowed(path: bool) -> None:
    """The documented exception: out is x itself (and a residual that is x itself)."""
    x = data()
    want = bk.batch_norm_forward(x.copy())[0]
    y = bk.batch_norm_forward(x, out=x)[0]
    assert y is x
    np.testing.assert_array_equal(x, want)
    x2 = data()
    want2 = bk.normalize(x2.copy(), np.zeros(C), np.ones(C), residual=x2.copy())
    bk.normalize(x2, np.zeros(C), np.ones(C), residual=x2, out=x2)
    np.testing.assert_array_equal(x2, want2)


def test_parameters_may_share_memory_with_each_other(path: bool) -> None:
    """Read-only arguments may alias each other (gamma is beta, dy is x): nothing is written."""
    x = data()
    g = np.full(C, 0.5)
    y, mean, invstd = bk.batch_norm_forward(x, g, g)
    want = bk.batch_norm_forward(x, g, g.copy())[0]
    np.testing.assert_array_equal(y, want)
    dx = bk.batch_norm_backward(x, x, mean, invstd, g)[0]
    np.testing.assert_array_equal(dx, bk.batch_norm_backward(x.copy(), x, mean, invstd, g)[0])


# ---- scalars ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["False", "True", None, 2, 0.0, [True]])
def test_training_must_be_a_truth_value(path: bool, value: Any) -> None:
    x = data()
    rm, rv = np.zeros(C), np.ones(C)
    before = (rm.copy(), rv.copy())
    with pytest.raises(TypeError, match=r"^training: expected a bool"):
        bk.batch_norm_forward(x, running_mean=rm, running_var=rv, training=value)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    _, mean, invstd = bk.batch_norm_forward(x)
    with pytest.raises(TypeError, match=r"^training: expected a bool"):
        bk.batch_norm_backward(x, x, mean, invstd, training=value)


def test_numpy_bools_and_0_1_still_work(path: bool) -> None:
    x = data()
    want = bk.batch_norm_forward(x, running_mean=np.zeros(C), running_var=np.ones(C),
                                 training=False)[0]  # fmt: skip
    for value in (np.False_, 0):
        got = bk.batch_norm_forward(x, running_mean=np.zeros(C), running_var=np.ones(C),
                                    training=value)[0]  # fmt: skip
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 10.0])
def test_momentum_outside_0_1_is_refused_by_every_function(path: bool, momentum: float) -> None:
    x = data()
    rm, rv = np.zeros(C), np.ones(C)
    calls = [
        lambda: bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=momentum),
        lambda: bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=momentum,
                                      mask=np.ones(6, bool)),
        lambda: bk.batch_renorm_forward(x, running_mean=rm, running_var=rv, momentum=momentum),
        lambda: bk.ghost_batch_norm_forward(x, virtual_batch_size=3, running_mean=rm,
                                            running_var=rv, momentum=momentum),
        lambda: bk.update_running_stats(rm, rv, 6, np.zeros(C), np.ones(C), momentum=momentum),
    ]  # fmt: skip
    for fn in calls:
        refused(fn, [rm, rv], r"^momentum: expected a number in \[0, 1\]")


def test_momentum_at_the_ends_is_allowed(path: bool) -> None:
    x = data()
    rm, rv = np.full(C, 7.0), np.full(C, 7.0)
    bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.0)
    np.testing.assert_array_equal(rm, np.full(C, 7.0))
    _, mean, _ = bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_array_equal(rm, mean)


@pytest.mark.parametrize("value", ["relu ", "gelu", 1, True])
def test_activation_by_name_only(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^activation: expected None or 'relu'"):
        bk.batch_norm_forward(data(), activation=value)


@pytest.mark.parametrize("value", ["False", 2, None])
def test_layer_flags_are_truth_values(value: Any) -> None:
    for name in ("affine", "track_running_stats", "renorm"):
        with pytest.raises(TypeError, match=rf"^{name}: expected a bool"):
            bk.BatchNorm(C, **{name: value})
    layer = bk.BatchNorm(C)
    with pytest.raises(TypeError, match=r"^mode: expected a bool"):
        layer.train(value)
    assert layer.mode == "train"


# ---- masked arrays and other subclasses ---------------------------------------------------------


def test_masked_array_inputs_are_refused() -> None:
    x = data()
    mx = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    with pytest.raises(TypeError, match=r"^x: a numpy.ma.MaskedArray .* mask="):
        bk.batch_norm_forward(mx)
    _, mean, invstd = bk.batch_norm_forward(x)
    with pytest.raises(TypeError, match=r"^dy: a numpy.ma.MaskedArray"):
        bk.batch_norm_backward(mx, x, mean, invstd)
    with pytest.raises(TypeError, match=r"^x: a numpy.ma.MaskedArray"):
        bk.channel_stats(mx)
    with pytest.raises(TypeError, match=r"^x: a numpy.ma.MaskedArray"):
        bk.BatchNorm(C, dtype=np.float64)(mx)
    with pytest.raises(TypeError, match=r"^gamma: a numpy.ma.MaskedArray"):
        bk.batch_norm_forward(x, np.ma.masked_array(np.ones(C)))


def test_other_ndarray_subclasses_still_work(path: bool) -> None:
    class Tagged(np.ndarray):
        pass

    x = data()
    want = bk.batch_norm_forward(x)[0]
    got = bk.batch_norm_forward(x.view(Tagged))[0]
    np.testing.assert_array_equal(got, want)


# ---- unaligned arrays ---------------------------------------------------------------------------


def unaligned(shape: tuple[int, ...], dtype: Any, fill: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous, writeable array of `dtype` one byte off its element alignment."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    a = np.frombuffer(bytearray(n * dt.itemsize + 1), dt, count=n, offset=1).reshape(shape)
    assert not a.flags.aligned and a.flags.c_contiguous and a.flags.writeable
    if fill is not None:
        a[...] = fill
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_arrays_small(path: bool, dtype: Any) -> None:
    """Unaligned x, out, running statistics: the same results as aligned ones, every write kept."""
    x = data((8, C, 5), dtype)
    dy = data((8, C, 5), dtype, seed=1)
    P = np.dtype(dtype)
    rm, rv = np.zeros(C, P), np.ones(C, P)
    y0, mean0, invstd0 = bk.batch_norm_forward(x, running_mean=rm, running_var=rv)
    xu = unaligned(x.shape, dtype, x)
    rmu, rvu = unaligned((C,), P, 0), unaligned((C,), P, 1)
    out = unaligned(x.shape, dtype)
    y, mean, invstd = bk.batch_norm_forward(xu, running_mean=rmu, running_var=rvu, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y0)
    np.testing.assert_array_equal(rmu, rm)
    np.testing.assert_array_equal(rvu, rv)
    dx0 = bk.batch_norm_backward(dy, x, mean0, invstd0)[0]
    dxu = unaligned(x.shape, dtype)
    bk.batch_norm_backward(unaligned(x.shape, dtype, dy), xu, mean, invstd, out=dxu)
    np.testing.assert_array_equal(dxu, dx0)


BIG_UNALIGNED = r"""
import sys, numpy as np, bnkernel as bk
from bnkernel import functional as F
F._FAST_PATH = sys.argv[1] == "fast"
shape = (16, 64, 64, 64)  # 16 MiB of float32: the streamed-store path
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
dy = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
def unaligned():
    n = x.size
    return np.frombuffer(bytearray(4 * n + 1), np.float32, count=n, offset=1).reshape(shape)
rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
y0, mean, invstd = bk.batch_norm_forward(x)
out = unaligned(); bk.batch_norm_forward(x, out=out); assert (out == y0).all(), "forward"
want = bk.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)[0]
out = unaligned()
bk.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, out=out)
assert (out == want).all(), "inference"
out = unaligned(); bk.normalize(x, mean, invstd, out=out)
assert (out == bk.normalize(x, mean, invstd)).all(), "normalize"
out = unaligned(); bk.batch_norm_backward(dy, x, mean, invstd, out=out)
assert (out == bk.batch_norm_backward(dy, x, mean, invstd)[0]).all(), "backward"
xu = unaligned(); xu[...] = x
assert (bk.batch_norm_forward(xu)[0] == y0).all(), "unaligned x"
print("ok")
"""


@pytest.mark.parametrize("which", ["fast", "checked"])
def test_unaligned_out_of_16_mib_does_not_crash(which: str) -> None:
    """The streamed-store path (outputs of 16 MiB and more) assumed alignment and segfaulted; in a
    subprocess, so that a crash fails this test rather than the run."""
    proc = subprocess.run([sys.executable, "-c", BIG_UNALIGNED, which], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


# ---- NaN padding --------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pad", [np.nan, np.inf])
def test_nan_padding_never_reaches_the_valid_gradients(relu: bool, dtype: Any, pad: float) -> None:
    rng = np.random.default_rng(3)
    N, L = 5, 7
    x = (rng.standard_normal((N, L, C)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal((N, L, C)).astype(dtype)
    mask = np.ones((N, L), bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    x[~mask] = pad
    g = rng.uniform(0.5, 1.5, C).astype(dtype)
    act = "relu" if relu else None
    y, mean, invstd = bk.batch_norm_forward(x, g, axis=-1, mask=mask, activation=act)
    assert np.isfinite(mean).all() and np.isfinite(invstd).all()
    dx, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=-1, mask=mask,
                                        activation=act, y=y if relu else None)  # fmt: skip
    assert np.isfinite(dg).all() and np.isfinite(db).all()
    assert np.isfinite(dx[mask]).all()
    # the reference: padded positions whose value is not finite enter no sum, i.e. the exact
    # gradient with those positions' dy set to 0 (their x then does not matter)
    gm = ref.relu_backward(dy, np.where(np.isfinite(y), y, 0)) if relu else dy.astype(np.float64)
    gm = np.where(mask[..., None], gm, 0.0)
    xf = np.where(mask[..., None], x, 0.0)
    rdx, rdg, rdb = ref.masked_backward(gm, xf, mean, invstd, mask, g, -1)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx[mask], rdx[mask], rtol=tol, atol=tol)
    np.testing.assert_allclose(dg, rdg, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, rdb, rtol=tol, atol=tol)


def test_finite_padding_enters_the_sums_as_before() -> None:
    """Only non-finite padding is kept out: finite padding is summed as it always was (the exact
    gradient of a loss that uses every output), bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5, C))
    dy = rng.standard_normal((6, 5, C))
    mask = rng.random((6, 5)) < 0.6
    mask[0, :2] = True
    _, mean, invstd = bk.batch_norm_forward(x, axis=-1, mask=mask)
    _, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, axis=-1, mask=mask)
    _, rdg, rdb = ref.masked_backward(dy, x, mean, invstd, mask, None, -1)
    np.testing.assert_allclose(dg, rdg, rtol=1e-12)
    np.testing.assert_allclose(db, rdb, rtol=1e-12)


# ---- load_state_dict ----------------------------------------------------------------------------


def trained_layer() -> bk.BatchNorm:
    layer = bk.BatchNorm(C, dtype=np.float64)
    layer(data((8, C)))
    layer.params["gamma"][...] = 2.0
    return layer


def snapshot(layer: bk.BatchNorm) -> dict[str, Any]:
    return {**layer.state_dict(), "n": layer.num_batches_tracked}


def assert_unchanged(layer: bk.BatchNorm, before: dict[str, Any]) -> None:
    after = snapshot(layer)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_load_state_dict_writes_nothing_when_a_later_entry_is_bad() -> None:
    layer = trained_layer()
    before = snapshot(layer)
    state = {
        "weight": np.full(C, 9.0),
        "bias": np.full(C, 9.0),
        "running_mean": np.full(C, 9.0),
        "running_var": np.ones(C + 1),  # the last one is wrong
        "num_batches_tracked": np.array(5),
    }
    with pytest.raises(ValueError, match=r"^state\['running_var'\]: expected shape"):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("value", [-1, np.array(-3)])
def test_negative_batch_count_is_refused(value: Any) -> None:
    layer = trained_layer()
    before = snapshot(layer)
    state = {**layer.state_dict(), "num_batches_tracked": value}
    state["weight"] = np.full(C, 5.0)
    with pytest.raises(ValueError, match=r"^state\['num_batches_tracked'\]: expected an integer"):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("value", ["many", 2.5, np.array([1, 2]), None])
def test_bad_batch_count_names_its_key(value: Any) -> None:
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match=r"^state\['num_batches_tracked'\]: expected an integer"):
        layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": value})
    assert_unchanged(layer, before)


def test_value_that_cannot_convert_names_its_key() -> None:
    layer = trained_layer()
    before = snapshot(layer)
    state = {**layer.state_dict(), "running_mean": np.array(["a", "b", "c", "d"])}
    with pytest.raises(ValueError, match=r"^state\['running_mean'\]: expected numbers"):
        layer.load_state_dict(state)
    state = {**layer.state_dict(), "bias": [object()] * C}
    with pytest.raises(TypeError, match=r"^state\['bias'\]: expected numbers"):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("state", [None, "weights", 3.0])
def test_load_state_dict_needs_a_mapping_or_a_keras_list(state: Any) -> None:
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match=r"^state: expected a mapping of names to arrays \(what "
                       r"state_dict\(\) returns\) or a list in Keras' get_weights\(\) order "
                       r"\(gamma, beta, moving_mean, moving_variance\), got "):  # fmt: skip
        layer.load_state_dict(state)
    assert_unchanged(layer, before)


def test_a_keras_weight_list_of_the_wrong_length_is_refused() -> None:
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"^state: expected a list of 4 arrays in Keras' "
                       r"get_weights\(\) order \(gamma, beta, moving_mean, moving_variance\), "
                       r"got 3"):  # fmt: skip
        layer.load_state_dict([np.ones(C)] * 3)
    assert_unchanged(layer, before)


def test_a_good_state_still_loads() -> None:
    src = trained_layer()
    dst = bk.BatchNorm(C, dtype=np.float64)
    dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, snapshot(src))


# ---- merge_stats --------------------------------------------------------------------------------


def test_merge_stats_refuses_a_count_that_overflows() -> None:
    part = (2**62, np.zeros(C), np.zeros(C))
    with pytest.raises(OverflowError, match=r"^stats: the total count"):
        bk.merge_stats(part, part)
    n, _, _ = bk.merge_stats(part, (2**62 - 1, np.zeros(C), np.zeros(C)))
    assert n == 2**63 - 1


# ---- the fast path's rules are the argument layer's ---------------------------------------------


def test_fast_path_rules_are_the_argument_layers() -> None:
    from bnkernel import _checks, _core

    assert tuple(_checks.FAST_PATH_RULES) == _core.fast_path_rules


def test_the_public_functions_have_no_private_checks_left() -> None:
    """Every public module takes its argument rules from _checks: none defines its own."""
    import inspect

    from bnkernel import functional, layer, masked, phases, variants

    for mod in (functional, phases, masked, variants, layer):
        src = inspect.getsource(mod)
        assert "def _relu_arg" not in src and "def _count_arg" not in src
        assert "np.shares_memory" not in src and "may_share_memory" not in src
        assert "def _mask_arg" not in src


def test_scripts_see_the_same_rules() -> None:
    """A smoke test of a training step in a fresh interpreter (no test fixtures)."""
    code = textwrap.dedent(
        """
        import numpy as np, bnkernel as bk
        layer = bk.BatchNorm(3, dtype=np.float64)
        x = np.random.default_rng(0).standard_normal((8, 3))
        layer(x); layer.backward(np.ones_like(x))
        print(layer.num_batches_tracked)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_the_split_phases_still_resolve_from_functional() -> None:
    """The split phases moved to bnkernel.phases; the old bnkernel.functional names are the same
    functions, and a name that never existed still raises AttributeError."""
    import bnkernel.functional as functional
    import bnkernel.phases as phases

    for name in phases.__all__:
        assert getattr(functional, name) is getattr(phases, name)
    with pytest.raises(AttributeError, match="no attribute 'batch_norm'"):
        functional.batch_norm  # noqa: B018
