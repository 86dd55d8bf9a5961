"""Command line: ``python -m bnkernel {check,bench,info,demo}``.

``check`` times the plain forward and backward on a set of shapes and layouts against the float64
NumPy reference (:mod:`bnkernel.reference`), then compares every kernel path (inference, frozen,
fused residual + ReLU, masks, split phases) in every data dtype with it
(:mod:`bnkernel.coverage`); it exits non-zero if any result is off.
``bench`` times the kernels against textbook NumPy and (when importable) torch, as times, GB/s and
passes over memory next to the machine's copy bandwidth (:mod:`bnkernel.bench`).  ``demo`` runs
the seed experiments (:mod:`bnkernel.examples`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core, reference
from ._version import __version__
from .bench import cli as bench_cli
from .bench.accuracy import TOLERANCE, rel_err
from .bench.timing import median_time
from .functional import batch_norm_backward, batch_norm_forward

# (label, shape, axis)
CHECK_CASES: list[tuple[str, tuple[int, ...], int]] = [
    ("(N, C)", (256, 64), 1),
    ("(N, C) C=1", (512, 1), 1),
    ("NCL C=17", (16, 17, 100), 1),
    ("NCHW", (16, 32, 28, 28), 1),
    ("NHWC axis=-1", (16, 28, 28, 32), -1),
    ("NCDHW", (4, 8, 6, 10, 10), 1),
]


def run_check(repeat: int = 5, out: Any = None) -> bool:
    """Print the agreement/timing table; return True when every result is within tolerance."""
    write = (out or sys.stdout).write
    rng = np.random.default_rng(0)
    header = (
        f"{'case':<14} {'shape':<20} {'dtype':<8} {'op':<9} {'max rel err':>11} {'bnkernel':>10} "
        f"{'numpy ref':>10} {'speedup':>8}\n"
    )
    write(
        f"bnkernel {__version__}: agreement with the float64 NumPy reference, and timings "
        f"(median of {repeat}, {functional_threads()} threads) of the plain float32 / float64 "
        "forward and backward\n"
    )
    write(header)
    write("-" * (len(header) - 1) + "\n")
    ok = True
    for label, shape, axis in CHECK_CASES:
        for dtype in (np.float32, np.float64):
            x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            c = shape[axis]
            gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
            beta = rng.standard_normal(c).astype(dtype)
            rows = _check_rows(x, dy, gamma, beta, axis)
            for op, err, fast, slow in rows:
                t_fast = median_time(fast, repeat)
                t_slow = median_time(slow, repeat)
                bad = err > TOLERANCE[np.dtype(dtype)]
                ok &= not bad
                write(
                    f"{label:<14} {'x'.join(map(str, shape)):<20} {np.dtype(dtype).name:<8} "
                    f"{op:<9} {err:>11.2e} {t_fast * 1e3:>8.3f}ms {t_slow * 1e3:>8.3f}ms "
                    f"{t_slow / t_fast:>7.1f}x{'  <-- FAILED' if bad else ''}\n"
                )
    from .coverage import run_coverage

    ok &= run_coverage(CHECK_CASES, out)
    write("all results within tolerance\n" if ok else "SOME RESULTS ARE OUT OF TOLERANCE\n")
    return ok


Row = tuple[str, float, Callable[[], object], Callable[[], object]]


def _check_rows(
    x: NDArray[Any], dy: NDArray[Any], gamma: NDArray[Any], beta: NDArray[Any], axis: int
) -> list[Row]:
    """(op, error vs the reference, bnkernel call, reference call) for forward and backward."""
    y, mean, invstd = batch_norm_forward(x, gamma, beta, axis=axis)
    ry, rmean, rinvstd = reference.forward_train(x, gamma, beta, 1e-5, axis)
    dx, dgamma, dbeta = batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    rdx, rdgamma, rdbeta = reference.backward_train(dy, x, rmean, rinvstd, gamma, axis)
    backward_err = max(rel_err(dx, rdx), rel_err(dgamma, rdgamma), rel_err(dbeta, rdbeta))
    return [
        ("forward", rel_err(y, ry),
         lambda: batch_norm_forward(x, gamma, beta, axis=axis),
         lambda: reference.forward_train(x, gamma, beta, 1e-5, axis)),
        ("backward", backward_err,
         lambda: batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis),
         lambda: reference.backward_train(dy, x, rmean, rinvstd, gamma, axis)),
    ]  # fmt: skip


def functional_threads() -> int:
    return int(_core.get_num_threads())


def info_lines() -> list[str]:
    return [
        f"bnkernel {__version__}",
        f"numpy {np.__version__}",
        f"OpenMP: {'yes' if _core.have_openmp else 'no'}",
        f"threads: {_core.get_num_threads()} (at most {_core.max_threads})",
        f"SIMD kernels (chosen at run time): {_core.isa}",
        f"native build (-march=native): {'yes' if _core.native_build else 'no'}",
        cuda_line(),
        f"sanitizers (ASan + UBSan): {'yes' if _core.sanitized else 'no'}",
        "data dtypes: float32, float64, float16, bfloat16 "
        f"(ml_dtypes {_ml_dtypes_version() or 'not installed'})",
    ]


def cuda_line() -> str:
    """What ``info`` says of CUDA: whether this build has the CUDA module (``bnkernel._cuda``,
    built with ``-Ccmake.define.BNKERNEL_CUDA=ON``), its runtime, the driver and the GPUs."""
    try:
        from . import _cuda
    except ImportError:
        return "CUDA: no (built without BNKERNEL_CUDA=ON; the CUDA kernels are not in this build)"
    i = _cuda.info()

    def version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    driver = version(i["driver_version"]) if i["driver_version"] else "none"
    cupy = _cupy_version()
    head = (
        f"CUDA: module built (runtime {version(i['runtime_version'])}, driver {driver}, "
        f"CuPy {cupy or 'not installed: pip install bnkernel[cuda]'})"
    )
    if i["error"] is not None:
        return f"{head}; no usable GPU: {i['error']}"
    gpus = "; ".join(
        f"{d['index']}: {d['name']} (sm_{d['compute_capability'][0]}{d['compute_capability'][1]}, "
        f"{d['memory'] / 2**30:.0f} GiB)"
        for d in i["devices"]
    )
    return f"{head}; GPUs {gpus}"


def _cupy_version() -> str | None:
    """The installed CuPy's version (any of its CUDA builds), without importing it."""
    from importlib import metadata

    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _ml_dtypes_version() -> str | None:
    """The version of ml_dtypes, which provides NumPy's bfloat16, without importing it."""
    from importlib import metadata

    try:
        return metadata.version("ml_dtypes")
    except metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a closed stdout (``check | head``) ends the command quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # (the reader is gone: point stdout at /dev/null so that the interpreter's final flush
        # does not raise again, and exit as a program cut short by SIGPIPE would)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnkernel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="agreement with the reference, and timings")
    p_check.add_argument("--repeat", type=int, default=5, help="timed repeats per case (median)")
    p_check.add_argument("--threads", type=int, default=None, help="kernel threads (default: all)")
    p_bench = sub.add_parser(
        "bench",
        help="benchmark table: bnkernel vs NumPy textbook and torch, GB/s, passes over memory",
        description="Time bnkernel's kernels against textbook NumPy and torch (checking every "
        "result against the float64 reference first): median times, speedups, GB/s, and passes "
        "over x next to the machine's measured copy bandwidth.",
    )
    bench_cli.add_arguments(p_bench)
    sub.add_parser("info", help="version and build options")
    p_demo = sub.add_parser(
        "demo",
        help="the seed experiments: NumPy training loops with and without batch normalization",
        description="Train small NumPy networks with and without batch normalization (circles, "
        "Iris, digits, small batches), print the results and save plots and JSON.  Needs "
        'pip install "bnkernel[examples]" for the data sets, progress bars and plots.',
    )
    from .examples import cli as demo_cli

    demo_cli.add_arguments(p_demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo_cli.main_from_args(args)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "bench":
        return bench_cli.main_from_args(args)
    if args.threads is not None:
        _core.set_num_threads(args.threads)
    return 0 if run_check(repeat=max(1, args.repeat)) else 1


if __name__ == "__main__":
    sys.exit(main())
