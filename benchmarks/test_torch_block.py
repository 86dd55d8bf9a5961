"""pytest-benchmark: a ResNet basic block's forward + backward in torch, with torch.nn.BatchNorm2d
and with bnkernel.torch's (the drop-in, and the fused residual + ReLU), grouped by memory format
and thread count so each group's table compares the versions on the same data.

    python -m pytest benchmarks/test_torch_block.py --benchmark-only -q

The versions are checked against torch's block (outputs and gradients) before timing; the same
block is :func:`bnkernel.bench.block.run_block_bench`'s (``python -m bnkernel bench
--torch-block``), which also times the block without BN.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

from bnkernel import _core  # noqa: E402
from bnkernel.bench import block as _block  # noqa: E402

SHAPE = (8, 64, 56, 56)
THREADS = sorted({1, min(2, os.cpu_count() or 1)})


@functools.cache
def setup(layout: str) -> tuple[dict[str, Any], Any, Any]:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    blocks = {v: _block.make_block(torch, SHAPE[1], v).to(memory_format=fmt)
              for v in _block.VERSIONS}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*SHAPE, generator=gen).to(memory_format=fmt)
    dy = torch.randn(*SHAPE, generator=gen).to(memory_format=fmt)
    _block._check(torch, blocks, x, dy)
    return blocks, x.requires_grad_(), dy


def _params() -> list[Any]:
    out = []
    for layout in _block.BLOCK_LAYOUTS:
        for t in THREADS:
            group = f"resnet-block-{layout}-{t}thr"
            for v in _block.VERSIONS:
                out.append(pytest.param(layout, t, v, marks=pytest.mark.benchmark(group=group),
                                        id=f"{group}-{v.replace(' ', '_')}"))  # fmt: skip
    return out


@pytest.mark.parametrize("layout,threads,version", _params())
def test_resnet_block(benchmark: Any, layout: str, threads: int, version: str) -> None:
    blocks, x, dy = setup(layout)
    t0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    _core.set_num_threads(threads)
    try:
        benchmark(_block._iteration(blocks[version], x, dy))
    finally:
        torch.set_num_threads(t0)
        _core.set_num_threads(0)
