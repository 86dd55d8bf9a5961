"""``python -m bnkernel bench --device cuda``: the CUDA kernels on CuPy arrays against the CuPy
textbook (the NumPy textbook's code, run on CuPy arrays) and torch CUDA's ``F.batch_norm`` (cuDNN
where torch picks it), in one run, with the device-to-device copy bandwidth measured in the same
run.

Times come from CUDA events on CuPy's current stream around a batch of calls (the batch sized to
take about ``min_time / repeat``), one batch of each implementation in turn per round, the order
rotated every round; the median over ``repeat`` rounds is reported.  A copy of x reads and writes
it: 2 passes; the passes of a row are ``time / (bytes(x) / copy bandwidth)``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _device
from ..functional import batch_norm_backward, batch_norm_forward
from . import textbook
from .cases import EPS, BenchCheckError, BenchError
from .units import fmt_bytes, shape_text

# >= 1 GiB (the speed goals), about 800 MiB, L2-resident (H200: 60 MB), small
CUDA_SHAPES = [(128, 64, 224, 224), (256, 256, 56, 56), (32, 128, 28, 28), (8, 64, 16, 16)]
CUDA_QUICK_SHAPES = [(32, 64, 56, 56), (8, 64, 16, 16)]
CUDA_OPS = ("forward_train", "forward_infer", "backward_train")
CHECK_BYTES = 256 << 20
GOALS = {"forward_train": 2.5, "forward_infer": 2.1, "backward_train": 4.0}  # passes, >= 1 GiB


def _events(cp: Any) -> tuple[Any, Any]:
    return cp.cuda.Event(), cp.cuda.Event()


def time_batches(cp: Any, fns: dict[str, Callable[[], Any]], repeat: int, min_time: float
                 ) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each function: `repeat` rounds of one batch each, order rotated."""
    names = list(fns)
    per_round = max(min_time / max(repeat, 1), 1e-4)
    batch: dict[str, int] = {}
    for name, fn in fns.items():  # warm up, then size the batch
        fn()
        start, end = _events(cp)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = max(cp.cuda.get_elapsed_time(start, end) / 1e3, 1e-7)
        batch[name] = int(min(max(per_round / one, 1), 10_000))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], batch[name]
            start, end = _events(cp)
            start.record()
            for _ in range(k):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(cp.cuda.get_elapsed_time(start, end) / 1e3 / k)
    return samples


def copy_bandwidth(cp: Any, nbytes: int, repeat: int, min_time: float) -> float:
    """GB/s of a device-to-device copy of `nbytes` (bytes read + bytes written per second)."""
    a = cp.zeros(nbytes // 4, np.float32)
    b = cp.empty_like(a) if hasattr(cp, "empty_like") else cp.empty(a.shape, a.dtype)

    def copy() -> None:
        b[...] = a

    t = statistics.median(time_batches(cp, {"copy": copy}, repeat, min_time)["copy"])
    return 2 * int(a.nbytes) / t / 1e9


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _case_arrays(cp: Any, shape: tuple[int, ...], layout: str, dtype: str, seed: int) -> Any:
    """x in the layout (NHWC: stored channels-last, channel axis -1) and the per-channel arrays."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    stored = (shape[0], *shape[2:], C) if layout == "NHWC" else shape
    x = cp.asarray((rng.standard_normal(stored) * 2 + 0.5).astype(dtype))
    dy = cp.asarray(rng.standard_normal(stored).astype(dtype))
    P = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    per = {
        "gamma": cp.asarray(rng.uniform(0.5, 1.5, C).astype(P)),
        "beta": cp.asarray(rng.standard_normal(C).astype(P)),
        "rm": cp.asarray(np.zeros(C, P)),
        "rv": cp.asarray(np.ones(C, P)),
    }
    return x, dy, per


def run_cuda_bench(
    shapes: list[tuple[int, ...]], layouts: list[str], dtypes: list[str], ops: list[str],
    repeat: int, min_time: float, torch: bool, textbook_peer: bool, copy_mib: float,
    json_path: str | None, out: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The table: one row per (shape, layout, dtype, op); returns the rows."""
    out = sys.stdout if out is None else out
    try:
        cp = _device.cupy()
        kernels = _device.kernels_module()
    except ImportError as e:
        raise BenchError(str(e)) from None
    info = kernels.info()
    if info["error"] is not None:
        raise BenchError(f"--device cuda: no usable GPU: {info['error']}")
    th = _torch_cuda() if torch else None
    dev = info["devices"][int(cp.cuda.Device().id)] if info["devices"] else {"name": "?"}
    copy_bytes = int(copy_mib * 2**20)
    bw = copy_bandwidth(cp, copy_bytes, repeat, min_time)
    torch_text = th.__version__ if th is not None else "not used"
    print(
        f"bench --device cuda: {dev['name']}, runtime {info['runtime_version']}, driver "
        f"{info['driver_version']}, CuPy {getattr(cp, '__version__', '?')}, torch {torch_text}; "
        f"copy {fmt_bytes(copy_bytes)}: {bw:.0f} GB/s (read + write)",
        file=out,
    )
    print(f"{'shape':<16}{'layout':<7}{'dtype':<9}{'op':<16}{'bnkernel':>11}{'passes':>8}"
          f"{'GB/s':>8}{'vs cupy':>9}{'vs torch':>9}", file=out)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for si, shape in enumerate(shapes):
        for layout in layouts:
            if len(shape) < 3 and layout == "NHWC":
                continue
            axis = -1 if layout == "NHWC" else 1
            for dtype in dtypes:
                x, dy, per = _case_arrays(cp, shape, layout, dtype, si)
                nbytes = int(x.nbytes)
                for op in ops:
                    fns = _implementations(cp, th, op, x, dy, per, axis, textbook_peer)
                    samples = time_batches(cp, fns, repeat, min_time)
                    _check(cp, op, fns, x, dy, per, axis)
                    t = {k: statistics.median(v) for k, v in samples.items()}
                    row = {
                        "shape": list(shape), "layout": layout, "dtype": dtype, "op": op,
                        "bytes": nbytes, "seconds": t, "copy_gbps": bw,
                        "passes": t["bnkernel"] / (nbytes / (bw * 1e9)),
                        "gbps": nbytes / t["bnkernel"] / 1e9,
                        "vs_cupy": t["cupy"] / t["bnkernel"] if "cupy" in t else None,
                        "vs_torch": t["torch"] / t["bnkernel"] if "torch" in t else None,
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{shape_text(shape):<16}{layout:<7}{dtype:<9}{op:<16}"
                        f"{t['bnkernel'] * 1e6:>9.1f}us{row['passes']:>8.2f}{row['gbps']:>8.0f}"
                        f"{_ratio(row['vs_cupy']):>9}{_ratio(row['vs_torch']):>9}",
                        file=out,
                    )
    big = [r for r in rows if r["bytes"] >= 2**30 and r["op"] in GOALS]
    for r in big:
        r["goal_passes"] = GOALS[r["op"]]
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump({"device": dev, "copy_gbps": bw, "rows": rows}, f, indent=1, default=str)
    return rows


def _ratio(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _implementations(
    cp: Any, th: Any, op: str, x: Any, dy: Any, per: dict[str, Any], axis: int, peer: bool
) -> dict[str, Callable[[], Any]]:
    """bnkernel's call and its peers' for one op (the running statistics are copies per
    implementation, so that training calls update their own)."""
    g, b = per["gamma"], per["beta"]
    rm, rv = per["rm"].copy(), per["rv"].copy()
    _, mean, invstd = batch_norm_forward(x, g, b, axis=axis)
    fns: dict[str, Callable[[], Any]] = {}
    if op == "forward_train":
        fns["bnkernel"] = lambda: batch_norm_forward(x, g, b, running_mean=rm, running_var=rv,
                                                     axis=axis)  # fmt: skip
    elif op == "forward_infer":
        fns["bnkernel"] = lambda: batch_norm_forward(x, g, b, running_mean=rm, running_var=rv,
                                                     training=False, axis=axis)  # fmt: skip
    else:
        fns["bnkernel"] = lambda: batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
    ax = axis % x.ndim
    if peer:
        trm, trv = per["rm"].copy(), per["rv"].copy()
        if op == "forward_train":
            fns["cupy"] = lambda: textbook.forward_train(x, g, b, trm, trv, ax)
        elif op == "forward_infer":
            fns["cupy"] = lambda: textbook.forward_infer(x, g, b, trm, trv, ax)
        else:
            fns["cupy"] = lambda: textbook.backward_train(dy, x, mean, invstd, g, ax)
    if th is not None:
        fns.update(_torch_fns(th, op, x, dy, per, axis))
    return fns


def _torch_fns(th: Any, op: str, x: Any, dy: Any, per: dict[str, Any], axis: int
               ) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """torch CUDA's F.batch_norm on the same memory (DLPack views; channels-last as torch's
    channels_last format, (N, C, H, W) with channels-last strides)."""
    F = th.nn.functional

    def view(a: Any) -> Any:
        t = th.from_dlpack(a)
        return t.movedim(-1, 1) if axis == -1 else t

    tx, tg, tb = view(x), th.from_dlpack(per["gamma"]), th.from_dlpack(per["beta"])
    trm, trv = th.from_dlpack(per["rm"].copy()), th.from_dlpack(per["rv"].copy())
    if op == "forward_train":
        return {"torch": lambda: F.batch_norm(tx, trm, trv, tg, tb, True, 0.1, EPS)}
    if op == "forward_infer":
        return {"torch": lambda: F.batch_norm(tx, trm, trv, tg, tb, False, 0.1, EPS)}
    txg = tx.detach().requires_grad_(True)
    tgg = tg.detach().clone().requires_grad_(True)
    tbg = tb.detach().clone().requires_grad_(True)
    ty = F.batch_norm(txg, None, None, tgg, tbg, True, 0.1, EPS)
    tdy = view(dy)
    return {"torch": lambda: th.autograd.grad(ty, (txg, tgg, tbg), tdy, retain_graph=True)}


def _check(cp: Any, op: str, fns: dict[str, Callable[[], Any]], x: Any, dy: Any,
           per: dict[str, Any], axis: int) -> None:  # fmt: skip
    """bnkernel's output against the float64 reference, for x up to CHECK_BYTES (larger ones run
    the same kernels; a wrong result fails the bench, as on the CPU)."""
    from .. import reference

    if x.nbytes > CHECK_BYTES:
        return
    y = fns["bnkernel"]()[0]
    xs = cp.asnumpy(x).astype(np.float64)
    g = cp.asnumpy(per["gamma"]).astype(np.float64)
    b = cp.asnumpy(per["beta"]).astype(np.float64)
    _, mean, invstd = reference.forward_train(xs, g, b, EPS, axis)
    if op == "backward_train":
        dys = cp.asnumpy(dy).astype(np.float64)
        want = reference.backward_train(dys, xs, mean, invstd, g, axis)[0]
    elif op == "forward_infer":
        rm = cp.asnumpy(per["rm"]).astype(np.float64)
        rv = cp.asnumpy(per["rv"]).astype(np.float64)
        want = reference.forward_infer(xs, rm, rv, g, b, EPS, axis)
    else:
        want = reference.forward_train(xs, g, b, EPS, axis)[0]
    got = cp.asnumpy(y).astype(np.float64)
    tol = 1e-2 if x.dtype.itemsize == 2 else 1e-4
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not err <= tol * (1 + float(np.max(np.abs(want)))):
        raise BenchCheckError(f"{op} on CUDA: max error {err:.3g} against the float64 reference")
