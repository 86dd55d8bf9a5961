"""The ``bench`` subcommand: its options, the config they make, and the exit status.

``python -m bnkernel bench`` (:mod:`bnkernel.__main__`) adds :func:`add_arguments` to its parser
and hands the parsed options to :func:`main_from_args`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .block import BLOCK_QUICK_SHAPE, BLOCK_SHAPES, run_block_bench
from .cases import (
    DEFAULT_SHAPES,
    DTYPES,
    LAYOUTS,
    OPS,
    QUICK_SHAPES,
    SWEEP_MAX_BYTES,
    SWEEP_MIN_BYTES,
    BenchCheckError,
    BenchError,
    default_dtypes,
)
from .cuda import CUDA_OPS, CUDA_QUICK_SHAPES, CUDA_SHAPES, run_cuda_bench
from .measure import BenchConfig
from .run import run_bench
from .timing import SWEEP_MAX_TIME_S
from .units import fmt_bytes, parse_choices, parse_shapes, parse_size, parse_threads, shape_text


def parse_sweep_size(text: str) -> int:
    """A size for ``--sweep-min`` / ``--sweep-max``: a power of two of at least 4 KiB."""
    n = parse_size(text)
    if n & (n - 1):
        raise ValueError(
            f"{text!r} ({n} bytes) is not a power of two: the sweep doubles the size of x, "
            "e.g. 256M or 1G"
        )
    if n < SWEEP_MIN_BYTES:
        raise ValueError(f"{text!r} ({n} bytes) is too small: the sweep starts at 4K or above")
    return n


def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    p.add_argument(
        "--threads", type=_argtype(parse_threads), default=None,
        help="comma-separated thread counts, e.g. 1,2 (default: bnkernel.get_num_threads())",
    )  # fmt: skip
    p.add_argument(
        "--shapes", type=_argtype(parse_shapes), default=None,
        help="comma-separated shapes, channels second, e.g. 32x256x56x56,64x3 (default: "
        + ",".join(map(shape_text, DEFAULT_SHAPES)) + ")",
    )  # fmt: skip
    p.add_argument(
        "--layouts", type=_argtype(lambda s: parse_choices(s, LAYOUTS, "layout")),
        default=None,
        help="NCHW (axis=1), NHWC (channels-last, axis=-1) for ndim >= 3; NC for 2-D shapes "
        "(default: all; with --sweep: NCHW)",
    )  # fmt: skip
    p.add_argument(
        "--dtypes", type=_argtype(lambda s: parse_choices(s, DTYPES, "dtype")),
        default=None,
        help="float32,float64,float16,bfloat16 (default: all, bfloat16 when ml_dtypes is "
        "installed; with --sweep: float32)",
    )  # fmt: skip
    p.add_argument(
        "--ops", type=_argtype(lambda s: parse_choices(s, OPS, "op")), default=None,
        help=f"{','.join(OPS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--repeat", type=int, default=None, help="at least this many timed samples (default 10)"
    )
    p.add_argument(
        "--min-time", type=float, default=0.1,
        help="and at least this many seconds of timed calls per measurement (default 0.1)",
    )  # fmt: skip
    p.add_argument(
        "--copy-mib", type=float, default=None,
        help="size of the copy-bandwidth array in MiB (default 256; 64 with --quick)",
    )  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument("--no-numpy", action="store_true", help="leave the NumPy textbook out")
    p.add_argument(
        "--numpy", action="store_true",
        help="time the NumPy textbook in a --sweep too (slow on the largest sizes; default off)",
    )  # fmt: skip
    p.add_argument(
        "--sweep", action="store_true",
        help="size sweep: (N, 64, H, W) inputs whose size doubles from 4K to --sweep-max; cost "
        "per byte and its ratio to the cost per byte past L2, cache sizes marked (default: "
        "float32, NCHW, all ops, no NumPy textbook)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-max", metavar="SIZE", type=_argtype(parse_sweep_size), default=None,
        help="largest bytes(x) of the sweep, a power of two with an optional K/M/G suffix "
        "(powers of 1024), e.g. 256M (default 1G)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-min", metavar="SIZE", type=_argtype(parse_sweep_size), default=None,
        help="smallest bytes(x) of the sweep, a power of two >= 4K (default 4K)",
    )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: shapes " + ",".join(map(shape_text, QUICK_SHAPES))
        + ", 3 samples",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", default=None, help="write every number to FILE")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cuda: the CUDA kernels on CuPy arrays against the CuPy textbook and torch CUDA "
        "(F.batch_norm), with the device-to-device copy bandwidth (needs a GPU, CuPy and a "
        "build with BNKERNEL_CUDA=ON; shapes default to "
        + ",".join(map(shape_text, CUDA_SHAPES)) + ", float32 and float16, ops "
        + ",".join(CUDA_OPS) + ")",
    )  # fmt: skip
    p.add_argument(
        "--torch-block", action="store_true",
        help="a ResNet basic block's forward + backward in torch with torch.nn.BatchNorm2d "
        "against bnkernel.torch's (drop-in and fused residual + ReLU) and without BN, float32, "
        "NCHW and channels_last (--layouts NCHW,NHWC), at each --threads count (default 1,2 "
        "capped at the cores); shapes " + ",".join(map(shape_text, BLOCK_SHAPES)) + " (--quick: "
        + shape_text(BLOCK_QUICK_SHAPE) + "; needs torch)",
    )  # fmt: skip
    p.add_argument(
        "--plot", metavar="FILE.png", default=None,
        help="plot time vs size (log-log; with --sweep: ns per byte vs size, cache sizes marked) "
        "to FILE.png (needs matplotlib)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    sweep = bool(args.sweep)
    if sweep and args.shapes is not None:
        raise BenchError("--shapes does not apply to --sweep, which picks (N, 64, H, W) shapes")
    if not sweep:
        for given, name in ((args.sweep_max, "--sweep-max"), (args.sweep_min, "--sweep-min")):
            if given is not None:
                raise BenchError(f"{name} only applies with --sweep")
        if args.numpy:
            raise BenchError("--numpy only applies with --sweep (the table times NumPy already)")
    if args.numpy and args.no_numpy:
        raise BenchError("--numpy and --no-numpy contradict each other")
    sweep_min = args.sweep_min if args.sweep_min is not None else SWEEP_MIN_BYTES
    sweep_max = args.sweep_max if args.sweep_max is not None else SWEEP_MAX_BYTES
    if sweep_min > sweep_max:
        raise BenchError(
            f"--sweep-min {fmt_bytes(sweep_min)} is larger than --sweep-max {fmt_bytes(sweep_max)}"
        )
    shapes = args.shapes if args.shapes is not None else (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    if sweep:
        shapes = []
    layouts = args.layouts if args.layouts is not None else (["NCHW"] if sweep else list(LAYOUTS))
    dtypes = (
        args.dtypes if args.dtypes is not None else (["float32"] if sweep else default_dtypes())
    )
    ops = args.ops if args.ops is not None else list(OPS)
    repeat = args.repeat if args.repeat is not None else (3 if quick else 10)
    if repeat < 1:
        raise BenchError("--repeat: expected an integer >= 1")
    if args.min_time < 0:
        raise BenchError("--min-time: expected a number of seconds >= 0")
    copy_mib = args.copy_mib if args.copy_mib is not None else (64.0 if quick else 256.0)
    if copy_mib <= 0:
        raise BenchError("--copy-mib: expected a size > 0")
    return BenchConfig(
        shapes=list(shapes),
        layouts=list(layouts),
        dtypes=list(dtypes),
        ops=list(ops),
        threads=list(args.threads) if args.threads is not None else [],
        repeat=repeat,
        min_time=float(args.min_time),
        numpy=bool(args.numpy) if sweep else not args.no_numpy,
        torch=not args.no_torch,
        copy_mib=float(copy_mib),
        json_path=args.json,
        plot_path=args.plot,
        max_time=SWEEP_MAX_TIME_S if sweep else None,
        sweep=sweep,
        sweep_min=sweep_min,
        sweep_max=sweep_max,
    )


def run_cuda_from_args(args: argparse.Namespace) -> None:
    """``bench --device cuda``: the options that apply there, then the CUDA table."""
    for given, name in ((args.sweep, "--sweep"), (args.threads, "--threads"),
                        (args.plot, "--plot"), (args.numpy, "--numpy")):  # fmt: skip
        if given:
            raise BenchError(f"{name} does not apply to --device cuda")
    ops = args.ops if args.ops is not None else list(CUDA_OPS)
    other = [op for op in ops if op not in CUDA_OPS]
    if other:
        raise BenchError(f"--device cuda times {', '.join(CUDA_OPS)}; not {', '.join(other)}")
    dtypes = args.dtypes if args.dtypes is not None else ["float32", "float16"]
    if "bfloat16" in dtypes:
        raise BenchError("--device cuda: CuPy has no bfloat16 arrays (the kernels take it)")
    quick = bool(args.quick)
    shapes = args.shapes if args.shapes is not None else (
        CUDA_QUICK_SHAPES if quick else CUDA_SHAPES)  # fmt: skip
    repeat = args.repeat if args.repeat is not None else (3 if quick else 10)
    if repeat < 1:
        raise BenchError("--repeat: expected an integer >= 1")
    layouts = [lo for lo in (args.layouts or ["NCHW", "NHWC"]) if lo != "NC"] or ["NCHW"]
    run_cuda_bench(
        shapes=list(shapes), layouts=layouts, dtypes=list(dtypes), ops=ops, repeat=repeat,
        min_time=float(args.min_time), torch=not args.no_torch, textbook_peer=not args.no_numpy,
        copy_mib=args.copy_mib if args.copy_mib is not None else 1024.0, json_path=args.json,
    )  # fmt: skip


def run_block_from_args(args: argparse.Namespace) -> None:
    """``bench --torch-block``: the options that apply there, then the block's table."""
    for given, name in ((args.sweep, "--sweep"), (args.plot, "--plot"), (args.numpy, "--numpy"),
                        (args.dtypes, "--dtypes"), (args.ops, "--ops"),
                        (args.device != "cpu", "--device")):  # fmt: skip
        if given:
            raise BenchError(f"{name} does not apply to --torch-block")
    quick = bool(args.quick)
    shapes = args.shapes if args.shapes is not None else (
        [BLOCK_QUICK_SHAPE] if quick else list(BLOCK_SHAPES))  # fmt: skip
    layouts = ["channels_last" if lo == "NHWC" else lo for lo in (args.layouts or ["NCHW", "NHWC"])
               if lo != "NC"]  # fmt: skip
    if not layouts:
        raise BenchError("--torch-block: the layouts are NCHW and NHWC (channels_last)")
    cores = os.cpu_count() or 1
    threads = args.threads if args.threads is not None else sorted({1, min(2, cores)})
    repeat = args.repeat if args.repeat is not None else (3 if quick else 10)
    if repeat < 1:
        raise BenchError("--repeat: expected an integer >= 1")
    run_block_bench(shapes=list(shapes), layouts=layouts, threads=list(threads), repeat=repeat,
                    min_time=float(args.min_time), json_path=args.json)  # fmt: skip


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``bench`` for parsed arguments; 0 on success, 1 on a wrong result, 2 on a bad setup."""
    try:
        if getattr(args, "torch_block", False):
            run_block_from_args(args)
            return 0
        if getattr(args, "device", "cpu") == "cuda":
            run_cuda_from_args(args)
            return 0
        config = config_from_args(args)
        run_bench(config)
    except BenchCheckError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 0
