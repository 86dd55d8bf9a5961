"""Plots (``bench --plot``): time vs size for the table, cost per byte vs size for the sweep.

matplotlib is imported only here and only when a plot is asked for (``pip install
"bnkernel[bench]"``); :func:`require_matplotlib` fails early, before any timing, without it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .cases import IMPLS, OPS, BenchError
from .units import fmt_bytes

MATPLOTLIB_HINT = (
    "--plot needs matplotlib, which is not installed: pip install 'bnkernel[bench]' "
    "(or pip install matplotlib)"
)
COLORS = {"bnkernel": "tab:blue", "numpy": "tab:orange", "torch": "tab:green"}


def require_matplotlib() -> ModuleType:
    """``matplotlib.figure``, or :class:`BenchError` saying how to install it."""
    try:
        return importlib.import_module("matplotlib.figure")
    except ImportError:
        raise BenchError(MATPLOTLIB_HINT) from None


def layout_family(row: Mapping[str, Any]) -> str:
    """A row's layout family, which its plot marker shows: NC, channels-first or channels-last."""
    if row["layout"] == "NC":
        return "NC"
    return "channels-last" if row["axis"] == -1 else "channels-first"


def _panels(
    rows: Sequence[Mapping[str, Any]], width: float, height: float
) -> tuple[Any, list[Any], list[str]]:
    """A figure with a panel per op present in ``rows`` (two columns): (figure, axes, ops)."""
    figure_mod = require_matplotlib()
    if not rows:
        raise BenchError("nothing to plot: no results")
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    ncols = min(2, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = figure_mod.Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    return fig, axes, ops


def _save(fig: Any, axes: Sequence[Any], used: int, title: str, path: str) -> None:
    for axp in axes[used:]:
        axp.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def plot_report(report: Mapping[str, Any], path: str) -> None:
    """Time vs size of x (log-log), one panel per op, for the largest thread count measured;
    dashed: 1 pass at the copy bandwidth, dotted: the op's minimal traffic (2 or 3 passes)."""
    rows = report["results"]
    fig, axes, ops = _panels(rows, 6.4, 4.8)
    threads = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["threads"] == threads]
    bw = next(c["GBps"] for c in report["copy_bandwidth"] if c["threads"] == threads) * 1e9
    markers = {"NC": "o", "channels-first": "s", "channels-last": "^"}
    # a line per implementation, layout (the table's names) and dtype; the marker says the
    # layout family, the line style the dtype
    layouts = sorted({r["layout"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    styles = dict(zip(dtypes, ["-", "--", "-.", ":"] * 2, strict=False))
    for axp, op in zip(axes, ops, strict=False):
        op_rows = [r for r in rows if r["op"] == op]
        for impl in IMPLS:
            for layout in layouts:
                for dt in dtypes:
                    sel = [r for r in op_rows if r.get(impl) is not None
                           and r["layout"] == layout and r["dtype"] == dt]  # fmt: skip
                    if not sel:
                        continue
                    xs, ys = zip(*sorted((r["bytes"], r[impl]["median_s"]) for r in sel),
                                 strict=True)  # fmt: skip
                    axp.plot(xs, ys, marker=markers[layout_family(sel[0])], ls=styles[dt],
                             color=COLORS[impl], label=f"{impl} {layout} {dt}")  # fmt: skip
        sizes = np.array(sorted({r["bytes"] for r in op_rows}), dtype=np.float64)
        passes = 2 if op.startswith("forward") else 3
        axp.plot(sizes, sizes / bw, "k--", lw=1, label="1 pass at copy bandwidth")
        axp.plot(sizes, passes * sizes / bw, "k:", lw=1, label=f"{passes} passes (minimal traffic)")
        axp.set_xscale("log")
        axp.set_yscale("log")
        axp.set_xlabel("bytes(x)")
        axp.set_ylabel("seconds per call (median)")
        axp.set_title(f"{op}, {threads} thread{'s' if threads > 1 else ''}")
        axp.grid(True, which="both", alpha=0.3)
        axp.legend(fontsize="x-small")
    m = report["machine"]
    _save(fig, axes, len(ops), f"bnkernel {m['bnkernel']} on {m['cpu']}", path)


def plot_sweep(report: Mapping[str, Any], path: str) -> None:
    """A sweep's cost per byte vs the size of x (log-log), one panel per op, a line per
    implementation, layout, dtype and thread count; vertical lines at the cache sizes, dotted
    horizontal lines at the op's minimal traffic at the copy bandwidth (per thread count)."""
    rows = report["results"]
    fig, axes, ops = _panels(rows, 7.2, 5.0)
    thread_counts = sorted({int(r["threads"]) for r in rows})
    styles = ["-", "--", "-.", ":"]
    markers = {"channels-first": "o", "channels-last": "^"}
    dtypes = sorted({r["dtype"] for r in rows})
    bws = {int(c["threads"]): float(c["GBps"]) for c in report["copy_bandwidth"]}
    for axp, op in zip(axes, ops, strict=False):
        op_rows = [r for r in rows if r["op"] == op]
        for impl in IMPLS:
            for fam, marker in markers.items():
                for dt in dtypes:
                    for k, t in enumerate(thread_counts):
                        pts = sorted(
                            (r["bytes"], r[impl]["ns_per_byte"])
                            for r in op_rows
                            if r.get(impl) is not None
                            and layout_family(r) == fam
                            and r["dtype"] == dt
                            and int(r["threads"]) == t
                        )
                        if not pts:
                            continue
                        xs, ys = zip(*pts, strict=True)
                        names = sorted({r["layout"] for r in op_rows if layout_family(r) == fam})
                        label = f"{impl} {'/'.join(names)}" + (f" {dt}" if len(dtypes) > 1 else "")
                        label += f" {t}T" if impl != "numpy" else ""
                        axp.plot(
                            xs, ys, marker=marker, ms=3, color=COLORS[impl],
                            ls=styles[k % len(styles)], label=label,
                        )  # fmt: skip
        passes = 2 if op.startswith("forward") else 3
        for k, t in enumerate(thread_counts):
            if t in bws:
                axp.axhline(
                    passes / bws[t], color="k", ls=styles[k % len(styles)], lw=0.8, alpha=0.6,
                    label=f"{passes} passes at copy bandwidth, {t}T",
                )  # fmt: skip
        sizes = sorted({int(r["bytes"]) for r in op_rows})
        for c in report.get("caches", []):
            if not sizes[0] <= c["bytes"] <= sizes[-1]:
                continue  # outside the sweep: would only stretch the axis
            axp.axvline(c["bytes"], color="tab:red", ls="--", lw=0.8, alpha=0.7)
            axp.annotate(
                f"{c['name']} {fmt_bytes(c['bytes'])}", (c["bytes"], 1.0),
                xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                va="top", fontsize="x-small", color="tab:red", rotation=90,
            )  # fmt: skip
        axp.set_xscale("log", base=2)
        axp.set_yscale("log")
        ticks = sizes[:: max(1, math.ceil(len(sizes) / 10))]
        axp.set_xticks(ticks, labels=[fmt_bytes(n) for n in ticks], rotation=45, ha="right")
        axp.set_xticks([], minor=True)
        axp.set_xlabel("bytes(x)")
        axp.set_ylabel("ns per byte of x (median time / bytes)")
        axp.set_title(op)
        axp.grid(True, which="both", alpha=0.3)
        axp.legend(fontsize="x-small", loc="lower left")  # the cache labels are at the top
    m = report["machine"]
    _save(fig, axes, len(ops), f"bnkernel {m['bnkernel']} size sweep on {m['cpu']}", path)
