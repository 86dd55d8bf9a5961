"""``python -m bnkernel demo``: run the experiments, print their tables, save plots and JSON."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .demos import DEMOS

NAMES = list(DEMOS)
# the demos whose data ship with scikit-learn (bnkernel[examples]); circles makes its own
NEEDS_SKLEARN = ("iris", "digits", "smallbatch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "names",
        nargs="*",
        default=["all"],
        metavar="DEMO",
        help=f"which: {', '.join(NAMES)} or all (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run of each (fewer seeds, epochs and sweep points; seconds)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration")
    p.add_argument(
        "--out",
        default="bnkernel-demo",
        help="folder for the PNG plots and results.json (default: ./bnkernel-demo)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Bar:
    """A tqdm bar when tqdm is installed, else a line per finished run on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        self._enabled = enabled
        self._done = 0
        self._total = total
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, label: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif self._enabled:
            print(f"[{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _plotting_available() -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        return True
    except ImportError:
        return False


def main_from_args(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    names = NAMES if "all" in args.names else args.names
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        print(
            f"demo: unknown {', '.join(unknown)}; expected {', '.join(NAMES)} or all",
            file=sys.stderr,
        )
        return 2
    need = [n for n in names if n in NEEDS_SKLEARN]
    if need and importlib.util.find_spec("sklearn") is None:
        print(
            f"demo: {', '.join(need)} read data sets that ship with scikit-learn, which is not "
            'installed: pip install "bnkernel[examples]" (or run only: circles)',
            file=sys.stderr,
        )
        return 2
    plot = not args.no_plot
    if plot and not _plotting_available():
        print(
            'demo: matplotlib is not installed, so no plots (pip install "bnkernel[examples]")',
            file=sys.stderr,
        )
        plot = False
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {}
    json_path = os.path.join(args.out, "results.json")
    for name in names:
        runner, table, plotter, full_kw, quick_kw, count = DEMOS[name]
        kw = dict(quick_kw if args.quick else full_kw)
        if args.seeds is not None:
            kw["seeds"] = args.seeds
        bar = _Bar(count(kw), name, not args.no_progress)
        t0 = time.perf_counter()
        try:
            result = runner(progress=bar, **kw)
        finally:
            bar.close()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        out(table(result))
        out(f"({result['seconds']:.0f} s)")
        if plot:
            path = os.path.join(args.out, f"{name}.png")
            plotter(result, path)
            out(f"plot: {path}")
        out("")
        with open(json_path, "w") as f:  # after each demo, so a long run loses nothing
            json.dump(results, f, indent=1, default=float)
    out(f"results: {json_path}")
    return 0
