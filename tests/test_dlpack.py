"""Any CPU array that speaks DLPack, without copies: torch CPU tensors (and a minimal exporter
standing for JAX and the other array-API libraries) go into every public function as NumPy views
(``np.from_dlpack``); outputs are NumPy arrays; ``out=`` and the running statistics may be
writeable DLPack arrays, whose memory is written; read-only exports are refused as outputs.

The results must be bit-identical to the same call on NumPy arrays: the same kernels run on the
same memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnkernel as bk

torch = pytest.importorskip("torch")


class Exporter:
    """A bare DLPack exporter over a NumPy array (what a JAX CPU array or any array-API array
    offers: ``__dlpack__`` and ``__dlpack_device__``, no ``__array__``)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._a.__dlpack_device__()


def readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    C = 5
    return {
        "x": (rng.standard_normal((6, C, 4, 3)) * 2 + 1).astype(np.float32),
        "dy": rng.standard_normal((6, C, 4, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, C).astype(np.float32),
        "beta": rng.uniform(-1, 1, C).astype(np.float32),
        "rm": rng.standard_normal(C).astype(np.float32),
        "rv": rng.uniform(0.5, 2, C).astype(np.float32),
    }


def wraps(kind: str, a: np.ndarray) -> Any:
    if kind == "torch":
        return torch.from_numpy(a.copy())
    return Exporter(a.copy())


KINDS = ["torch", "exporter"]


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_and_backward_take_dlpack_arrays(kind: str, data: dict) -> None:
    d = data
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"], running_mean=rm,
                                            running_var=rv)  # fmt: skip
    dx, dg, db = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["gamma"])

    x, g, b = (wraps(kind, d[k]) for k in ("x", "gamma", "beta"))
    rm_t, rv_t = wraps(kind, d["rm"]), wraps(kind, d["rv"])
    y2, mean2, _ = bk.batch_norm_forward(x, g, b, running_mean=rm_t, running_var=rv_t)
    assert type(y2) is np.ndarray and type(mean2) is np.ndarray
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(mean2, mean)
    # the running statistics were updated in the exporter's own memory
    np.testing.assert_array_equal(np.from_dlpack(rm_t), rm)
    np.testing.assert_array_equal(np.from_dlpack(rv_t), rv)
    grads = bk.batch_norm_backward(wraps(kind, d["dy"]), x, wraps(kind, mean), invstd, g)
    for got, want in zip(grads, (dx, dg, db), strict=True):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)


def test_inputs_are_viewed_not_copied(data: dict) -> None:
    """In-place forward on a torch tensor: out is x itself, so the tensor holds y afterwards."""
    d = data
    want = bk.batch_norm_forward(d["x"])[0]
    t = torch.from_numpy(d["x"].copy())
    y, _, _ = bk.batch_norm_forward(t, out=t)
    assert y is t  # out= is returned as given
    np.testing.assert_array_equal(t.numpy(), want)


@pytest.mark.parametrize("kind", KINDS)
def test_out_may_be_a_writeable_dlpack_array(kind: str, data: dict) -> None:
    d = data
    want = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"])[0]
    out = wraps(kind, np.zeros_like(d["x"]))
    y, _, _ = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"], out=out)
    assert y is out
    np.testing.assert_array_equal(np.from_dlpack(out), want)


def test_every_function_family_takes_torch_tensors(data: dict) -> None:
    d = data
    T = torch.from_numpy
    x = T(d["x"].copy())
    # split phases
    st = bk.channel_stats(x)
    np.testing.assert_array_equal(st[1], bk.channel_stats(d["x"])[1])
    y = bk.normalize(x, T(st[1].copy()), T(1 / np.sqrt(st[2] / st[0] + 1e-5)))
    assert type(y) is np.ndarray
    # variants
    rm, rv = T(d["rm"].copy()), T(d["rv"].copy())
    y1 = bk.batch_renorm_forward(x, running_mean=rm, running_var=rv)[0]
    y2 = bk.batch_renorm_forward(d["x"], running_mean=d["rm"].copy(), running_var=d["rv"].copy())[0]
    np.testing.assert_array_equal(y1, y2)
    g1 = bk.ghost_batch_norm_forward(x, virtual_batch_size=3)[0]
    np.testing.assert_array_equal(g1, bk.ghost_batch_norm_forward(d["x"], virtual_batch_size=3)[0])
    # masks
    mask = torch.ones(6, 4, 3, dtype=torch.bool)
    mask[0] = False
    ym = bk.batch_norm_forward(x, mask=mask)[0]
    np.testing.assert_array_equal(ym, bk.batch_norm_forward(d["x"], mask=mask.numpy())[0])
    # the layer
    layer = bk.BatchNorm(5)
    np.testing.assert_array_equal(layer(x), bk.BatchNorm(5)(d["x"]))
    np.testing.assert_array_equal(layer.backward(T(d["dy"].copy())), layer.backward(d["dy"]))


def test_channels_last_tensors_are_strided_views(data: dict) -> None:
    """A channels_last tensor is an NHWC array in memory: viewed with its strides; the kernels
    read it with axis=-1 after a permute, with no copy, and any axis works as for NumPy."""
    x = torch.from_numpy(data["x"].copy()).to(memory_format=torch.channels_last)
    nhwc = x.permute(0, 2, 3, 1)
    assert nhwc.is_contiguous()
    y, mean, _ = bk.batch_norm_forward(nhwc, axis=-1)
    want = bk.batch_norm_forward(np.ascontiguousarray(data["x"].transpose(0, 2, 3, 1)), axis=-1)
    np.testing.assert_array_equal(y, want[0])
    # the NCHW view of the same tensor is strided: read through one explicit copy, same result
    np.testing.assert_array_equal(bk.batch_norm_forward(x)[1], mean)


def test_read_only_exports_are_refused_as_outputs(data: dict) -> None:
    out = Exporter(readonly(np.zeros_like(data["x"])))
    with pytest.raises(ValueError, match=r"^out: is read-only \(a copy would drop the writes\)"):
        bk.batch_norm_forward(data["x"], out=out)
    rm = Exporter(readonly(data["rm"]))
    with pytest.raises(ValueError, match=r"^running_mean: is read-only"):
        bk.batch_norm_forward(data["x"], running_mean=rm, running_var=data["rv"].copy())
    # as inputs, read-only exports are fine
    y = bk.batch_norm_forward(Exporter(readonly(data["x"])))[0]
    np.testing.assert_array_equal(y, bk.batch_norm_forward(data["x"])[0])


def test_a_tensor_that_requires_grad_is_refused_by_name(data: dict) -> None:
    x = torch.from_numpy(data["x"].copy()).requires_grad_()
    with pytest.raises(TypeError, match=r"^x: this torch\.Tensor cannot be viewed without a copy"):
        bk.batch_norm_forward(x)
    with pytest.raises(TypeError, match=r"^gamma: .*require"):
        bk.batch_norm_forward(data["x"], torch.ones(5, requires_grad=True))


def test_bfloat16_tensors_get_a_way_out(data: dict) -> None:
    x = torch.from_numpy(data["x"].copy()).bfloat16()
    with pytest.raises(TypeError, match=r"^x: NumPy cannot view .*bfloat16.*bnkernel\.torch"):
        bk.batch_norm_forward(x)


def test_float16_tensors_go_in(data: dict) -> None:
    x16 = data["x"].astype(np.float16)
    y = bk.batch_norm_forward(torch.from_numpy(x16.copy()))[0]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, bk.batch_norm_forward(x16)[0])


def test_non_contiguous_out_tensor_is_refused(data: dict) -> None:
    out = torch.zeros(6, 4, 3, 5).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    with pytest.raises(ValueError, match=r"^out: must be C-contiguous"):
        bk.batch_norm_forward(data["x"], out=out)


def test_overlap_rule_sees_through_dlpack(data: dict) -> None:
    """out= and x given as two torch tensors over overlapping memory: refused as for NumPy."""
    base = torch.from_numpy(np.zeros((7, 5, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"^out: overlaps an input array"):
        bk.batch_norm_forward(base[:6], out=base[1:])


def test_a_lazily_negated_tensor_is_refused(data: dict) -> None:
    """torch's DLPack export of a tensor with the negative bit set hands over the memory without
    the negation (NumPy would see -x); refused, naming the fix, as an input and as out=."""
    z = torch.complex(torch.from_numpy(data["dy"].copy()), torch.from_numpy(data["x"].copy()))
    neg = z.conj().imag  # float32 -x, negative bit set over x's memory
    assert neg.is_neg()
    with pytest.raises(TypeError, match=r"^x: .*negative bit.*resolve_neg\(\)"):
        bk.batch_norm_forward(neg)
    with pytest.raises(TypeError, match=r"^out: .*negative bit"):
        bk.batch_norm_forward(data["x"], out=torch.zeros(6, 5, 4, 3)._neg_view())
    y = bk.batch_norm_forward(neg.resolve_neg())[0]
    np.testing.assert_array_equal(y, bk.batch_norm_forward(-data["x"])[0])


def test_split_phases_and_population_stats_take_torch_tensors() -> None:
    """Every split phase, the running update in place, population statistics and the layer's
    state loading, on torch tensors: the same numbers as on NumPy arrays."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def T(a: np.ndarray) -> Any:
        return torch.from_numpy(np.array(a, copy=True))

    st = bk.channel_stats(x)
    stt = bk.channel_stats(T(x))
    merged = bk.merge_stats(st, st)
    merged_t = bk.merge_stats((stt[0], T(stt[1]), T(stt[2])), stt)
    np.testing.assert_array_equal(merged_t[1], merged[1])
    inv = bk.invstd_from_stats(st[0], st[2])
    np.testing.assert_array_equal(bk.invstd_from_stats(stt[0], T(stt[2])), inv)
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    rm_t, rv_t = T(rm), T(rv)
    bk.update_running_stats(rm, rv, *merged)
    bk.update_running_stats(rm_t, rv_t, merged_t[0], T(merged_t[1]), T(merged_t[2]))
    np.testing.assert_array_equal(rm_t.numpy(), rm)
    np.testing.assert_array_equal(rv_t.numpy(), rv)
    sums = bk.backward_reduce(dy, x, st[1], inv)
    sums_t = bk.backward_reduce(T(dy), T(x), T(st[1]), T(inv))
    np.testing.assert_array_equal(sums_t[1], sums[1])
    dx = bk.backward_elementwise(dy, x, st[1], inv, None, *sums, st[0])
    out = torch.empty(6, 5, 4)
    bk.backward_elementwise(T(dy), T(x), T(st[1]), T(inv), None, T(sums[0]), T(sums[1]), st[0],
                            out=out)  # fmt: skip
    np.testing.assert_array_equal(out.numpy(), dx)
    assert bk.population_stats([T(x), T(x)])[0] == 48
    layer = bk.BatchNorm(5)
    layer.set_population_stats((stt[0], T(stt[1]), T(stt[2])))
    state = layer.state_dict()
    other = bk.BatchNorm(5)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_array_equal(other.running_var, layer.running_var)
