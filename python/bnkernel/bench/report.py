"""The printed report: the headers, the results table, the sweep's tables, the progress lines.

Everything here formats a report (the dict that is also written as JSON) into text; nothing here
measures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .timing import PEER_MAX_TIME_S, CopyBandwidth
from .units import fmt_bytes, fmt_float, fmt_nspb, fmt_ratio, fmt_time

# What the columns both the table and the sweep report mean (written into their JSON).
SHARED_DEFINITIONS = {
    "GBps": "minimal traffic / time: forward 2*bytes(x), backward 3*bytes(x); 1e9 B/GB",
    "passes": "median time / (bytes(x) / copy bandwidth), the copy of x itself at the same thread "
    "count in the same run (bnkernel._core.memory_pass: the kernels' threads for that size and "
    "store policy, streaming stores past 16 MiB); a copy is 2 passes",
    "passes_range": "the same for the fastest and the slowest sample",
    "passes_vs_memory": "median time / (bytes(x) / the 256 MiB copy bandwidth at the same thread "
    "count)",
    "copy_bandwidth": "copy: 2 * bytes / median time; read, write: bytes / median time "
    "(bnkernel._core.memory_pass on --copy-mib arrays)",
    "speedup": "peer time / bnkernel time",
    "numpy": "textbook NumPy in x's dtype, one thread, timed once per case (not per thread count)",
}

Columns = Sequence[tuple[str, str]]  # (heading, alignment "<" or ">")
Series = tuple[str, str, str, int]  # (op, layout, dtype, threads)


def median(row: Mapping[str, Any], impl: str) -> float | None:
    """``impl``'s median seconds in a result row (None when it was not run)."""
    d = row.get(impl)
    return None if d is None else float(d["median_s"])


def series_key(row: Mapping[str, Any]) -> Series:
    """The series a result row belongs to: (op, layout, dtype, threads)."""
    return (row["op"], row["layout"], row["dtype"], int(row["threads"]))


def passes_range(row: Mapping[str, Any]) -> str:
    """The passes of a row's fastest and slowest samples, "[lo-hi]" ("" when not measured)."""
    lo_hi = row.get("passes_range")
    return "" if not lo_hi else f"[{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]"


def row_line(row: Mapping[str, Any]) -> str:
    """One result as a progress line."""
    return (
        f"{row['shape']} {row['layout']} {row['dtype']} {row['op']} threads={row['threads']}: "
        f"bnkernel {fmt_time(median(row, 'bnkernel'))}, "
        f"numpy {fmt_time(median(row, 'numpy'))}, torch {fmt_time(median(row, 'torch'))}, "
        f"{row['GBps']:.1f} GB/s, {row['passes']:.2f} passes {passes_range(row)}"
    )


def _aligned(
    columns: Columns, cells: Sequence[Sequence[str]]
) -> tuple[str, Callable[[Sequence[str]], str]]:
    """The header line of ``columns`` and a function that lays out a row of cells below it."""
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _) in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [f"{v:{a}{w}}" for v, (_, a), w in zip(values, columns, widths, strict=True)]
        return "  ".join(parts).rstrip()

    return line([h for h, _ in columns]), line


def _preamble(
    report: Mapping[str, Any], copy_bw: Mapping[int, CopyBandwidth], torch: Any, what: str
) -> str:
    """The first three lines of both headers: the run, the copy bandwidth, the versions."""
    m = report["machine"]
    bw = "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: copy {b.gbps:.1f}, read {fmt_float(b.read_gbps, 1)}, "
        f"write {fmt_float(b.write_gbps, 1)} GB/s"
        for t, b in copy_bw.items()
    )
    nbytes = next(iter(copy_bw.values())).nbytes
    torch_text = "not used" if torch is None else str(torch.__version__)
    return (
        f"bnkernel {m['bnkernel']} {what} on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"threads {','.join(map(str, report['config']['threads']))}\n"
        f"memory bandwidth ({nbytes / (1 << 20):g} MiB, streaming stores; copy 2*bytes/t): {bw}\n"
        f"numpy {m['numpy']}, torch {torch_text}, OpenMP {'yes' if m['openmp'] else 'no'}, "
        f"native build {'yes' if m['native_build'] else 'no'}\n"
    )


def format_header(
    report: Mapping[str, Any], copy_bw: Mapping[int, CopyBandwidth], torch: Any
) -> str:
    """The table's header: machine, copy bandwidth, versions, what the columns mean."""
    cfg = report["config"]
    return _preamble(report, copy_bw, torch, "benchmark") + (
        f"times: median per call (>= {cfg['repeat']} samples and >= {cfg['min_time']:g} s; "
        f"numpy textbook one thread, capped at ~{PEER_MAX_TIME_S:g} s, not on 16-bit dtypes); "
        "bnkernel and torch with preallocated outputs where available\n"
        "GB/s: minimal traffic (forward 2x, backward 3x bytes(x)) / time; "
        "passes: time / (bytes(x) / bandwidth of a copy of x at the same thread count, "
        "streaming stores past 16 MiB), median [fastest-slowest sample]\n\n"
    )


_COLUMNS = [
    ("shape", "<"), ("layout", "<"), ("dtype", "<"), ("op", "<"), ("thr", ">"),
    ("bnkernel", ">"), ("numpy", ">"), ("torch", ">"), ("vs numpy", ">"), ("vs torch", ">"),
    ("GB/s", ">"), ("passes", ">"), ("range", "<"),
]  # fmt: skip


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as an aligned text table."""
    cells = [
        [
            r["shape"],
            r["layout"],
            r["dtype"],
            r["op"],
            str(r["threads"]),
            fmt_time(median(r, "bnkernel")),
            fmt_time(median(r, "numpy")),
            fmt_time(median(r, "torch")),
            fmt_ratio(r["speedup_vs_numpy"]),
            fmt_ratio(r["speedup_vs_torch"]),
            f"{r['GBps']:.1f}",
            f"{r['passes']:.2f}",
            passes_range(r),
        ]
        for r in rows
    ]
    header, line = _aligned(_COLUMNS, cells)
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)]) + "\n"


def caches_text(caches: Sequence[Mapping[str, Any]]) -> str:
    """The caches of a report (their JSON form) as one line."""
    if not caches:
        return "unknown (no cache sizes in sysfs: none marked)"
    parts = []
    for c in caches:
        shared = c.get("shared_cpu_list")
        parts.append(
            f"{c['name']} {fmt_bytes(c['bytes'])}" + (f" (CPUs {shared})" if shared else "")
        )
    return ", ".join(parts)


def format_sweep_header(
    report: Mapping[str, Any], copy_bw: Mapping[int, CopyBandwidth], torch: Any
) -> str:
    """A sweep's header: as the table's, with the caches, the shapes and what the ratio means."""
    sw = report["sweep"]
    cfg = report["config"]
    sizes = sw["sizes"]
    max_time = cfg["max_time"]
    cap = "" if max_time is None else f", or >= 3 samples once {max_time:g} s spent"
    if sizes[-1] > sw["baseline_above_bytes"]:
        base = f"the median ns/B of the same column's sizes past {sw['baseline']}"
    else:
        base = f"the ns/B of the largest size (no size is past {sw['baseline']})"
    return _preamble(report, copy_bw, torch, "size sweep") + (
        f"caches (cpu0): {caches_text(report['caches'])}\n"
        f"shapes {sw['shape_rule']}; bytes(x) from {fmt_bytes(sizes[0])} to "
        f"{fmt_bytes(sizes[-1])}; a forward also writes y, a backward reads dy and writes dx, "
        "each as large as x\n"
        f"times: median per call (>= {cfg['repeat']} samples and >= {cfg['min_time']:g} s{cap}; "
        f"numpy textbook one thread, capped at ~{PEER_MAX_TIME_S:g} s)\n"
        "ns/B: time / bytes(x); GB/s: minimal traffic (forward 2x, backward 3x bytes(x)) / time; "
        "passes: time / (bytes(x) / bandwidth of a copy of x at the same thread count)\n"
        f"ratio: ns/B / {base}; a cache cliff shows as a step in it (the smallest sizes pay the "
        "fixed cost of a call)\n"
        "----- lines: where bytes(x) passes a cache size\n\n"
    )


def format_sweep_table(report: Mapping[str, Any]) -> str:
    """A sweep's results: one block per series (op, layout, dtype, threads), a row per size, with a
    line where the size of x passes each of the machine's cache sizes (``report["caches"]``).
    Needs the ratios of :func:`bnkernel.bench.sweep.add_sweep_ratios`."""
    rows = report["results"]
    caches = report.get("caches", [])
    peers = [impl for impl in ("numpy", "torch") if any(r.get(impl) is not None for r in rows)]
    columns = [
        ("size", "<"), ("shape", "<"), ("bnkernel", ">"), ("ns/B", ">"), ("GB/s", ">"),
        ("passes", ">"), ("ratio", ">"),
    ]  # fmt: skip
    for impl in peers:
        columns += [(impl, ">"), ("ns/B", ">"), ("ratio", ">"), (f"vs {impl}", ">")]

    def cells_of(r: Mapping[str, Any]) -> list[str]:
        c = [
            fmt_bytes(r["bytes"]),
            r["shape"],
            fmt_time(median(r, "bnkernel")),
            fmt_nspb(r["bnkernel"].get("ns_per_byte")),
            f"{r['GBps']:.1f}",
            f"{r['passes']:.2f}",
            fmt_float(r["bnkernel"].get("cost_ratio"), 2),
        ]
        for impl in peers:
            res = r.get(impl)
            c += [
                fmt_time(median(r, impl)),
                fmt_nspb(None if res is None else res.get("ns_per_byte")),
                fmt_float(None if res is None else res.get("cost_ratio"), 2),
                fmt_ratio(r.get(f"speedup_vs_{impl}")),
            ]
        return c

    groups: dict[Series, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(series_key(r), []).append(r)
    all_cells = {id(r): cells_of(r) for r in rows}
    header, line = _aligned(columns, list(all_cells.values()))
    blocks = []
    for (op, layout, dtype, threads), group in groups.items():
        group = sorted(group, key=lambda r: r["bytes"])
        lines = [
            f"{op}, {layout}, {dtype}, {threads} thread{'s' if threads > 1 else ''}",
            header,
            "-" * len(header),
        ]
        for i, r in enumerate(group):
            if i > 0:
                for c in caches:
                    if group[i - 1]["bytes"] <= c["bytes"] < r["bytes"]:
                        text = f"----- {c['name']} {fmt_bytes(c['bytes'])} "
                        lines.append(text + "-" * max(0, len(header) - len(text)))
            lines.append(line(all_cells[id(r)]))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
