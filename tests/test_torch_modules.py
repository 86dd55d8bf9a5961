"""bnkernel.torch against torch.nn itself: BatchNorm1d/2d/3d as drop-ins (outputs, gradients,
buffers over several training steps, eval), autograd.gradcheck in float64, a small CNN trained
with torch's modules and with ours from the same seed, the swap helper, and what is refused.

Tolerances: in float64 both sides are exact to ~1e-15 of the magnitudes (1e-12 is a wide margin).
In float32 torch computes in float32 with its own summation order, so its results carry a few
ulps of error (measured on these shapes: up to ~5e-7 of the largest magnitude), and ours are
within half an ulp of the float64 result: 5e-6 of the quantity's magnitude, an order above
torch's error and far below any formula difference (biased against unbiased running variance
differs by 1/m ~ 1e-2 here; eps 1e-5 against 1e-3 by ~1e-3)."""

from __future__ import annotations

import copy
import subprocess
import sys
import zlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bnkernel.torch")

TOL = {torch.float32: 5e-6, torch.float64: 1e-12}

CASES = [
    # (ours, torch's, shape, memory format)
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (32, 7), None),
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 7, 9), None),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (8, 7, 6, 5), None),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (8, 7, 6, 5), torch.channels_last),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 1, 9, 9), None),  # C = 1
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (16, 33, 1, 1), None),  # spatial 1
    (bt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 7, 3, 4, 5), None),
    (bt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 7, 3, 4, 5), torch.channels_last_3d),
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d", "2d-channels_last", "2d-C1", "2d-HW1", "3d", "3d-cl3d"]

OPTIONS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": 0.3, "eps": 1e-3},
]
OPTION_IDS = ["default", "cumulative", "no-affine", "no-running", "momentum-eps"]


def close(a: Any, b: Any, dtype: Any, scale: float | None = None) -> None:
    """a within TOL of b, relative to b's largest magnitude (at least 1), or to ``scale``: for a
    sum over the batch (dgamma, dbeta), the sum of its terms' magnitudes, which sets the rounding
    error of any summation order."""
    a, b = a.detach().double(), b.detach().double()
    if scale is None:
        scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} at magnitude {scale:.3g}"


def make(
    ours: type, theirs: type, shape: tuple[int, ...], dtype: Any, gen: Any, **kw: Any
) -> tuple:
    C = shape[1]
    a = theirs(C, **kw).to(dtype)
    b = ours(C, **kw).to(dtype)
    if a.affine:
        with torch.no_grad():
            a.weight.uniform_(0.5, 1.5, generator=gen)
            a.bias.uniform_(-1, 1, generator=gen)
    b.load_state_dict(a.state_dict())
    return a, b


def sum_scales(x: Any, dy: Any, mean: Any, var: Any, eps: float) -> tuple[float, float]:
    """The largest per-channel sums of |dy * xhat| and |dy|: the magnitudes dgamma and dbeta are
    sums of."""
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x.double() - mean.double().view(view)) / (var.double().view(view) + eps).sqrt()
    dy = dy.double()
    return float((dy * xhat).abs().sum(dims).max()), float(dy.abs().sum(dims).max())


def batch(shape: tuple[int, ...], dtype: Any, fmt: Any, gen: Any) -> Any:
    x = torch.randn(*shape, dtype=dtype, generator=gen) * 3 + 1
    return x if fmt is None else x.to(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("ours,theirs,shape,fmt", CASES, ids=CASE_IDS)
def test_drop_in_over_training_steps_and_eval(ours, theirs, shape, fmt, opts, dtype) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, fmt, opts)).encode()))
    a, b = make(ours, theirs, shape, dtype, gen, **opts)
    for _ in range(3):
        x = batch(shape, dtype, fmt, gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        close(yb, ya, dtype)
        if fmt is not None:  # the output keeps the input's memory format, as torch's does
            assert yb.is_contiguous(memory_format=fmt)
        dy = torch.randn(*shape, dtype=dtype, generator=gen)
        a.zero_grad()
        b.zero_grad()
        ya.backward(dy)
        yb.backward(dy)
        close(xb.grad, xa.grad, dtype)
        if a.affine:
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.double().mean(dims), x.double().var(dims, unbiased=False)
            sg, sb = sum_scales(x, dy, mean, var, a.eps)
            close(b.weight.grad, a.weight.grad, dtype, sg)
            close(b.bias.grad, a.bias.grad, dtype, sb)
        for name, buf in a.named_buffers():
            mine = dict(b.named_buffers())[name]
            if name == "num_batches_tracked":
                assert int(mine) == int(buf)
            else:
                close(mine, buf, dtype)
    a.eval()
    b.eval()
    x = batch(shape, dtype, fmt, gen)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    close(yb, ya, dtype)
    a.zero_grad()
    b.zero_grad()
    ya.sum().backward()
    yb.sum().backward()
    close(xb.grad, xa.grad, dtype)
    if a.affine:
        if a.track_running_stats:
            mean, var = a.running_mean, a.running_var
        else:
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.double().mean(dims), x.double().var(dims, unbiased=False)
        sg, _ = sum_scales(x, torch.ones_like(x), mean, var, a.eps)
        close(b.weight.grad, a.weight.grad, dtype, sg)


def test_momentum_none_is_a_cumulative_average() -> None:
    bn = bt.BatchNorm1d(3, momentum=None)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(10, 3, dtype=torch.float64, generator=gen) for _ in range(4)]
    for x in xs:
        bn(x)
    means = torch.stack([x.mean(0) for x in xs])
    torch.testing.assert_close(bn.running_mean.double(), means.mean(0).float().double(),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    assert int(bn.num_batches_tracked) == 4


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: bt.batch_norm(x, None, None, w, b, True),
                                    (x, w, b))  # fmt: skip
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: bt.batch_norm(x, rm, rv, w, b, False),
                                    (x, w, b))  # fmt: skip
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: bt.batch_norm(x, None, None, w, b, True),
                                    (xcl, w, b))  # fmt: skip
    # the fused epilogue: relu(bn(x) + residual), gradients for x, gamma, beta and the residual
    # (data kept away from ReLU's kink, where a finite difference straddles it)
    r = torch.randn(4, 3, 5, 2, dtype=torch.float64, generator=gen, requires_grad=True)

    def fused(x, w, b, r):
        return bt.batch_norm(x, None, None, w, b, True, residual=r, activation="relu")

    assert torch.autograd.gradcheck(fused, (x, w, b, r))


def test_fused_epilogue_matches_the_unfused_chain() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=gen).to(
        memory_format=torch.channels_last
    )
    r = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=gen)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    want = torch.relu(torch.nn.functional.batch_norm(xa, None, None, training=True) + ra)
    got = bt.batch_norm(xb, None, None, training=True, residual=rb, activation="relu")
    close(got, want, torch.float64)
    dy = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=gen)
    want.backward(dy)
    got.backward(dy)
    close(xb.grad, xa.grad, torch.float64)
    close(rb.grad, ra.grad, torch.float64)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_as_the_kernels_define_it(half) -> None:
    """16-bit data with float32 parameters and running statistics: each output is the float32
    module's exact result on the same 16-bit inputs, rounded once to 16 bits (the kernels compute
    in double), so it is within half a 16-bit ulp of the float64 computation."""
    if half == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(8, 6, 5, 5, generator=gen) * 2 + 1).to(half)
    bn, ref = bt.BatchNorm2d(6), torch.nn.BatchNorm2d(6).double()
    xh, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = bn(xh), ref(xd)
    assert y.dtype == half and bn.running_mean.dtype == torch.float32
    ulp = torch.finfo(half).eps  # the spacing at 1; half an ulp of |v| is <= eps/2 * |v|
    y64, yd64 = y.detach().double(), yd.detach()
    assert float(((y64 - yd64).abs() - ulp / 2 * yd64.abs()).max()) <= 1e-7
    dy = torch.randn(8, 6, 5, 5, generator=gen).to(half)
    y.backward(dy)
    yd.backward(dy.double())
    assert xh.grad.dtype == half
    assert float(((xh.grad.double() - xd.grad).abs() - ulp / 2 * xd.grad.abs()).max()) <= 1e-7
    torch.testing.assert_close(bn.weight.grad.double(), ref.weight.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, rtol=1e-6, atol=1e-7)


def test_parameters_of_another_dtype_are_converted() -> None:
    """A module moved to float64 given float32 data: torch refuses the mix; ours converts the C
    parameters for the call and gives gradients in the parameters' dtype."""
    bn = bt.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and bn.weight.grad.dtype == torch.float64
    assert bn.running_mean.dtype == torch.float64 and int(bn.num_batches_tracked) == 1
    want = torch.nn.functional.batch_norm(x.detach().double(), None, None, training=True)
    close(y, want.float(), torch.float32)


# ---- a small CNN trained both ways ------------------------------------------------------------


def cnn(seed: int) -> Any:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_a_cnn_trains_to_the_same_weights(fmt) -> None:
    """Ten SGD steps from the same seed on the same batches: torch's modules and ours reach the
    same weights to float32 rounding.  The two differ per step by torch's few float32 ulps, and
    training amplifies that only mildly over ten steps; 1e-4 relative (hundreds of ulps) is far
    below what a wrong gradient or running statistic gives (order 1e-2 after one step)."""
    theirs = cnn(0)
    ours = bt.convert_batch_norm(copy.deepcopy(theirs))
    assert sum(isinstance(m, bt.BatchNorm2d) for m in ours.modules()) == 2
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        if fmt is not None:
            x = x.to(memory_format=fmt)
        target = torch.randint(0, 4, (16,), generator=gen)
        for model, opt in zip((theirs, ours), opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    for (name, p), q in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        if p.dtype == torch.int64:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


# ---- the swap helper --------------------------------------------------------------------------


def test_convert_and_revert_round_trip_the_state_exactly() -> None:
    model = cnn(2)
    model(torch.randn(8, 3, 8, 8))  # running statistics away from their initial values
    model[4].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    bt.convert_batch_norm(model)
    assert type(model[1]) is bt.BatchNorm2d and type(model[9]) is bt.BatchNorm1d
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # isinstance checks keep working
    assert not model[4].training and model[1].training  # each module's mode carried over
    assert [id(p) for p in model.parameters()] == params  # the very same tensors
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    bt.revert_batch_norm(model)
    assert type(model[1]) is torch.nn.BatchNorm2d and type(model[9]) is torch.nn.BatchNorm1d
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_an_optimizer_built_before_the_swap_keeps_training_the_model() -> None:
    model = cnn(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bt.convert_batch_norm(model)
    w = model[1].weight.detach().clone()
    torch.nn.functional.cross_entropy(
        model(torch.randn(8, 3, 8, 8)), torch.zeros(8).long()
    ).backward()
    opt.step()
    assert not torch.equal(model[1].weight, w)


def test_convert_a_batch_norm_root_and_leave_other_subclasses() -> None:
    root = torch.nn.BatchNorm3d(4, affine=False)
    new = bt.convert_batch_norm(root)
    assert type(new) is bt.BatchNorm3d and new.weight is None
    assert new.running_mean is root.running_mean
    sync = torch.nn.SyncBatchNorm(4)
    assert bt.convert_batch_norm(sync) is sync


def test_convert_refuses_a_model_on_another_device() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).to("meta")
    with pytest.raises(TypeError, match=r"^1: weight is on meta; bnkernel.torch runs on CPU"):
        bt.convert_batch_norm(model)


def test_state_dict_loads_across_the_two(tmp_path) -> None:
    a = torch.nn.BatchNorm2d(5)
    a(torch.randn(4, 5, 3, 3))
    b = bt.BatchNorm2d(5)
    b.load_state_dict(a.state_dict())
    path = tmp_path / "bn.pt"
    torch.save(b.state_dict(), path)
    c = torch.nn.BatchNorm2d(5)
    c.load_state_dict(torch.load(path))
    assert all(torch.equal(c.state_dict()[k], a.state_dict()[k]) for k in a.state_dict())


# ---- what is refused, and what never happens --------------------------------------------------


def test_other_devices_are_refused_naming_the_device() -> None:
    x = torch.randn(4, 3, device="meta")
    with pytest.raises(TypeError, match=r"^input: a tensor on meta; bnkernel.torch runs on CPU"):
        bt.batch_norm(x, None, None, training=True)


def test_one_value_per_channel_in_training_is_refused_and_counts_no_batch() -> None:
    bn = bt.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3))
    assert int(bn.num_batches_tracked) == 0
    bn.eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)  # eval takes single samples


def test_wrong_dimensions_are_refused_as_torch_refuses_them() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        bt.BatchNorm2d(3)(torch.randn(4, 3))


def test_non_float_input_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^input: expected float32, float64, float16 or bfloat16"):
        bt.batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, training=True)


def test_empty_batch_as_torch() -> None:
    a, b = torch.nn.BatchNorm2d(3), bt.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4)
    ya, yb = a(x), b(x)
    assert yb.shape == ya.shape
    torch.testing.assert_close(b.running_mean, a.running_mean, equal_nan=True)


def test_double_backward_is_refused_clearly() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = bt.batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        g.sum().backward()


def test_import_bnkernel_never_imports_torch() -> None:
    code = "import sys, bnkernel; bnkernel.batch_norm_forward; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_in_place_changes_of_saved_tensors_are_caught() -> None:
    """The backward reads x (and y, with the fused ReLU) as saved at the forward: changing them
    in place in between is caught by autograd's version check, as for torch's own modules, not
    silently differentiated at the new values."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    h = x * 1.0
    y = bt.BatchNorm1d(3)(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    h = x * 1.0
    y = bt.batch_norm(h, None, None, training=True, activation="relu")
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
