"""``bench --torch-block``: a ResNet basic block's forward + backward in torch, with torch's
BatchNorm2d and with bnkernel.torch's, end to end.

The block is ResNet's basic block at stride 1 (conv3x3, BN, ReLU, conv3x3, BN, + identity,
ReLU), float32, no conv bias.  Four versions of the same block, the same weights, timed in the
same rounds (:func:`bnkernel.bench.timing.time_calls`), at each thread count (torch's and
bnkernel's set alike) and memory format:

* ``torch``: torch.nn.BatchNorm2d;
* ``bnkernel``: the block after :func:`bnkernel.torch.convert_batch_norm` (the drop-in);
* ``bnkernel fused``: each BN fused with what follows it, BN + ReLU and BN + residual add +
  ReLU, one pass each way (:func:`bnkernel.torch.batch_norm` with ``activation="relu"`` and
  ``residual=``);
* ``no BN``: the block with both BNs removed, so that ``total - no BN`` is the batch norms' share
  (what the swap can win at most).

One iteration is ``y = block(x); y.backward(dy)`` with the gradients set to None first.  The
normalization steps (``relu(bn1(h))`` and ``relu(bn2(h) + x)``, forward and backward) are also
timed alone, in the same rounds, on fixed inputs of the block's shape: the part the swap changes,
without the convolutions' noise (a difference of two block times is mostly that noise).  Before
timing, the versions' outputs and input gradients are compared (float32 rounding); a mismatch
fails the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .cases import BenchCheckError, BenchError
from .timing import time_calls
from .units import shape_text

# ResNet-18/34's first stage at batch 16, and the CIFAR ResNets' first stage (ResNet-20...: 16
# channels at 32x32) at batch 128, where convolutions are cheaper and BN's share larger
BLOCK_SHAPES = ((16, 64, 56, 56), (128, 16, 32, 32))
BLOCK_QUICK_SHAPE = (4, 32, 28, 28)
BLOCK_LAYOUTS = ("NCHW", "channels_last")
VERSIONS = ("torch", "bnkernel", "bnkernel fused", "no BN")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BenchError("--torch-block needs torch: pip install 'bnkernel[torch]'") from None
    return torch


def make_block(torch: Any, channels: int, version: str, seed: int = 0) -> Any:
    """ResNet's basic block (stride 1, identity shortcut) with ``version``'s batch norm."""
    nn = torch.nn
    from .. import torch as bt

    class Block(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            with torch.no_grad():  # not the initial 1 and 0, so that BN's affine map matters
                for bn in (self.bn1, self.bn2):
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)

        def norm1(self, h: Any) -> Any:
            """relu(bn1(h)): the first normalization step."""
            if version == "bnkernel fused":
                return self._fused(self.bn1, h, None)
            return torch.relu(self.bn1(h))

        def norm2(self, h: Any, x: Any) -> Any:
            """relu(bn2(h) + x): the second normalization step, with the shortcut."""
            if version == "bnkernel fused":
                return self._fused(self.bn2, h, x)
            return torch.relu(self.bn2(h) + x)

        def forward(self, x: Any) -> Any:
            if version == "no BN":
                return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
            return self.norm2(self.conv2(self.norm1(self.conv1(x))), x)

        @staticmethod
        def _fused(bn: Any, h: Any, residual: Any) -> Any:
            """relu(bn(h) + residual) in one pass each way (training mode)."""
            return bt.batch_norm(
                h, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps,
                residual=residual, activation="relu",
            )  # fmt: skip

    block = Block()
    if version in ("bnkernel", "bnkernel fused"):
        bt.convert_batch_norm(block)
    return block


def _iteration(block: Any, x: Any, dy: Any) -> Callable[[], None]:
    def run() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(dy)

    return run


def _norm_iteration(torch: Any, block: Any, h1: Any, h2: Any, x: Any, dy: Any
                    ) -> Callable[[], None]:  # fmt: skip
    """The block's normalization steps alone, forward and backward, on fixed inputs of the
    block's shape: what the swap changes, timed without the convolutions' noise."""

    def run() -> None:
        block.zero_grad(set_to_none=True)
        for t in (h1, h2, x):
            t.grad = None
        torch.autograd.backward([block.norm1(h1), block.norm2(h2, x)], [dy, dy])

    return run


def _check(torch: Any, blocks: dict[str, Any], x: Any, dy: Any) -> None:
    """The bnkernel versions compute torch's block: output, dx and the weight gradients, each
    within 1e-2 of torch's in norm (||a - b|| / ||b||).

    Not closer, and not element by element: in float32 both blocks are ~1e-3 away from the
    float64 block in norm (measured at 16x64x56x56 channels_last: torch 1e-3, bnkernel 6e-4 for
    dx), from the convolutions' float32 sums and from ReLU masks that flip where a
    pre-activation is within rounding of 0, which moves single elements of dx by O(1) of its
    magnitude; torch's own channels_last BN backward adds ~1e-3 to dgamma.  A wrong batch norm
    (formula, layout, stale statistics) is off by O(1)."""
    results = {}
    for name, block in blocks.items():
        if name == "no BN":
            continue
        xx = x.detach().clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        y = block(xx)
        y.backward(dy)
        results[name] = (y.detach(), xx.grad, block.conv1.weight.grad, block.bn1.weight.grad,
                         block.bn2.weight.grad)  # fmt: skip
    what = ("output", "dx", "conv1's weight gradient", "bn1's dgamma", "bn2's dgamma")
    ref = results["torch"]
    for name, got in results.items():
        for w, a, b in zip(what, got, ref, strict=True):
            err = float((a.double() - b.double()).norm()) / max(float(b.double().norm()), 1e-300)
            if not err <= 1e-2:
                raise BenchCheckError(
                    f"--torch-block: {name}'s {w} differs from torch's by {err:.2e} in norm"
                )


def run_block_bench(
    *,
    shapes: Sequence[tuple[int, ...]],
    layouts: Sequence[str],
    threads: Sequence[int],
    repeat: int,
    min_time: float,
    json_path: str | None = None,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Time the four versions of the block; print a table (to ``out``, default stdout; progress
    lines to ``progress``, default stderr) and return its rows."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    torch = _torch()
    from .. import _core

    for shape in shapes:
        if len(shape) != 4:
            raise BenchError(f"--torch-block takes (N, C, H, W) shapes, got {shape_text(shape)}")
    torch_threads0 = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    out.write(
        "ResNet basic block (conv3x3-BN-ReLU-conv3x3-BN-add-ReLU), forward + backward, float32;\n"
        "median ms per iteration.  block: the whole block; BN steps: relu(bn1(h)) and\n"
        "relu(bn2(h) + x) alone, forward + backward (what the swap changes); x = torch / ours\n\n"
    )
    out.write(f"{'':<31} {'block':-^41}  {'BN steps':-^37}\n")
    out.write(f"{'shape':<16} {'layout':<10} {'thr':>3} {'torch':>7} {'ours':>7} {'fused':>7} "
              f"{'no BN':>7} {'x':>5} {'x fus':>5}  {'torch':>7} {'ours':>7} {'fused':>7} "
              f"{'x':>5} {'x fus':>6}\n")  # fmt: skip
    try:
        for shape in shapes:
            N, C, H, W = shape
            blocks = {v: make_block(torch, C, v) for v in VERSIONS}
            for layout in layouts:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                for b in blocks.values():
                    b.to(memory_format=fmt)
                gen = torch.Generator().manual_seed(1)

                x, dy, h1, h2 = (
                    torch.randn(N, C, H, W, generator=gen).to(memory_format=fmt) for _ in range(4)
                )
                _check(torch, blocks, x, dy)
                for a in (x, h1, h2):
                    a.requires_grad_()
                for t in threads:
                    torch.set_num_threads(t)
                    _core.set_num_threads(t)
                    progress.write(
                        f"timing the block {shape_text(shape)} {layout}, {t} thread(s)\n"
                    )
                    fns = {v: _iteration(b, x, dy) for v, b in blocks.items()}
                    for v in VERSIONS[:3]:
                        fns["steps " + v] = _norm_iteration(torch, blocks[v], h1, h2, x, dy)
                    timings = time_calls(fns, repeat, min_time)
                    ms = {v: timings[v].median * 1e3 for v in fns}
                    blk = {v: ms[v] for v in VERSIONS}
                    st = {v: ms["steps " + v] for v in VERSIONS[:3]}
                    row: dict[str, Any] = {
                        "shape": list(shape), "layout": layout, "threads": t, "block_ms": blk,
                        "bn_steps_ms": st,
                    }  # fmt: skip
                    row["block_speedup"] = blk["torch"] / blk["bnkernel"]
                    row["block_speedup_fused"] = blk["torch"] / blk["bnkernel fused"]
                    row["bn_steps_speedup"] = st["torch"] / st["bnkernel"]
                    row["bn_steps_speedup_fused"] = st["torch"] / st["bnkernel fused"]
                    rows.append(row)
                    out.write(
                        f"{shape_text(shape):<16} {layout.replace('channels_', 'ch_'):<10} {t:>3} "
                        f"{blk['torch']:>7.1f} {blk['bnkernel']:>7.1f} "
                        f"{blk['bnkernel fused']:>7.1f} {blk['no BN']:>7.1f} "
                        f"{row['block_speedup']:>5.2f} {row['block_speedup_fused']:>5.2f}  "
                        f"{st['torch']:>7.2f} {st['bnkernel']:>7.2f} {st['bnkernel fused']:>7.2f} "
                        f"{row['bn_steps_speedup']:>5.2f} {row['bn_steps_speedup_fused']:>6.2f}\n"
                    )
                    out.flush()
    finally:
        torch.set_num_threads(torch_threads0)
        _core.set_num_threads(0)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"torch_block": rows, "torch": torch.__version__}, f, indent=1)
    return rows
