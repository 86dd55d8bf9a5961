"""The machine: CPU model, library versions, memory size, and CPU 0's cache sizes from sysfs.

Every report carries :func:`machine_info`; the size sweep marks the cache sizes of
:func:`cache_sizes` and takes the sizes past L2 (:func:`baseline_threshold`) as its baseline.
"""

from __future__ import annotations

import glob
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .. import _core
from .._version import __version__
from .units import fmt_bytes, parse_size

# Sizes of x past this are "past L2" when the machine does not say how large its L2 is.
ASSUMED_L2_BYTES = 1 << 20
CACHE_SYSFS = "/sys/devices/system/cpu/cpu0/cache"


@dataclass(frozen=True)
class CacheLevel:
    """One data (or unified) cache of CPU 0, as the kernel reports it."""

    level: int
    kind: str  # "Data" or "Unified"
    nbytes: int
    shared_cpu_list: str | None = None

    @property
    def name(self) -> str:
        return f"L{self.level}{'d' if self.kind == 'Data' else ''}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "type": self.kind,
            "bytes": self.nbytes,
            "shared_cpu_list": self.shared_cpu_list,
        }


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cache_sizes(root: str | None = None) -> list[CacheLevel]:
    """CPU 0's data and unified caches from ``root`` (Linux sysfs: ``index*/{level,type,size}``;
    default :data:`CACHE_SYSFS`), by level; instruction caches are left out.  An empty list where
    the machine does not say (not Linux, no sysfs, unreadable entries): the sweep then marks no
    cache sizes."""
    root = CACHE_SYSFS if root is None else root
    found: dict[int, CacheLevel] = {}
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        level_text = _read_text(os.path.join(index, "level"))
        kind = _read_text(os.path.join(index, "type")) or "Unified"
        size_text = _read_text(os.path.join(index, "size"))
        if level_text is None or size_text is None or kind == "Instruction":
            continue
        try:
            level = int(level_text)
            nbytes = parse_size(size_text)
        except ValueError:
            continue
        shared = _read_text(os.path.join(index, "shared_cpu_list"))
        if level not in found or nbytes > found[level].nbytes:
            found[level] = CacheLevel(level, kind, nbytes, shared)
    return [found[k] for k in sorted(found)]


def fits_in(nbytes: int, caches: Sequence[CacheLevel]) -> str:
    """The name of the smallest cache that holds ``nbytes`` ("memory" when none does)."""
    for c in caches:
        if nbytes <= c.nbytes:
            return c.name
    return "memory"


def baseline_threshold(caches: Sequence[CacheLevel]) -> tuple[int, str]:
    """The size past which a sweep's sizes form the baseline of the cost ratio: the L2 cache's
    size, else the largest cache known, else an assumed 1 MiB; and where that number comes from."""
    l2 = [c for c in caches if c.level == 2]
    if l2:
        return l2[0].nbytes, f"L2 ({fmt_bytes(l2[0].nbytes)})"
    if caches:
        last = caches[-1]
        return last.nbytes, f"{last.name} ({fmt_bytes(last.nbytes)}; no L2 known)"
    return ASSUMED_L2_BYTES, f"{fmt_bytes(ASSUMED_L2_BYTES)} (cache sizes unknown; assumed L2)"


def physical_memory() -> int | None:
    """The machine's RAM in bytes, or None where the system does not say."""
    try:
        phys = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
    return phys if phys > 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(torch: ModuleType | None) -> dict[str, Any]:
    """The machine and the versions a report was made with."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else str(torch.__version__),
        "bnkernel": __version__,
        "openmp": bool(_core.have_openmp),
        "native_build": bool(_core.native_build),
        "default_threads": int(_core.get_num_threads()),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
