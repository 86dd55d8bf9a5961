"""Every instruction-set copy of the kernels gives correct results.

The kernels are compiled for several instruction sets and one is chosen at import (see
csrc/bnkernel/dispatch/isa.hpp); BNKERNEL_ISA asks for a lower one.  The rest of the suite runs
the copy this CPU picks; here each available copy runs a sample of every kernel in a fresh
interpreter and is checked against the float64 reference.  Results may differ between copies in
the last bits (their sums use different numbers of lanes), never by more than the tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ORDER = ["baseline", "avx2", "avx512"]


def _chosen_isa(request: str | None) -> str:
    """The copy a fresh interpreter picks with BNKERNEL_ISA=request (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "BNKERNEL_ISA"}
    if request is not None:
        env["BNKERNEL_ISA"] = request
    code = "import bnkernel; print(bnkernel._core.isa)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return run.stdout.strip()


# the best copy this CPU runs, whatever BNKERNEL_ISA this test run itself was started with
BEST = _chosen_isa(None)
AVAILABLE = ORDER[: ORDER.index(BEST) + 1]

SCRIPT = r"""
import json, numpy as np, bnkernel as bk
from bnkernel import reference as ref
rng = np.random.default_rng(0)
worst = {}
# (5, 11, 45) and (9, 37): interleaved with channel blocks in registers (8, 16 or 32 channels a
# block by instruction set) and channels left over
cases = [((6, 5, 7, 9), 1), ((9, 7, 5), -1), ((40, 3), 1), ((3, 2, 8, 4), 2), ((64, 2, 300), 1),
         ((5, 11, 45), -1), ((9, 37), 1)]
for shape, axis in cases:
    for dtype, tol in ((np.float32, 1e-6), (np.float64, 1e-12)):
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[axis]
        g = rng.uniform(0.5, 2, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        y, mean, invstd = bk.batch_norm_forward(x, g, b, axis=axis)
        ry, rmean, rinvstd = ref.forward_train(x, g, b, 1e-5, axis)
        dx, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
        rdx, rdg, rdb = ref.backward_train(dy, x, rmean, rinvstd, g, axis)
        fdx, _, _ = bk.batch_norm_backward(dy, x, mean, invstd, g, training=False, axis=axis)
        rfdx = ref.backward_frozen(dy, x, rmean, rinvstd, g, axis)[0]
        # the fused epilogue and the masked backward (compile-time variants of every kernel)
        res = rng.standard_normal(shape).astype(dtype)
        yr, _, _ = bk.batch_norm_forward(x, g, b, axis=axis, activation="relu", residual=res)
        ryr = ref.apply_epilogue(ry, res, True)
        gm = ref.relu_backward(dy, yr)
        mdx, _, _, mres = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis,
                                                 activation="relu", y=yr, residual_grad=True)
        rmdx = ref.backward_train(gm, x, rmean, rinvstd, g, axis)[0]
        mfdx, _, _ = bk.batch_norm_backward(dy, x, mean, invstd, g, training=False, axis=axis,
                                            activation="relu", y=yr)
        rmfdx = ref.backward_frozen(gm, x, rmean, rinvstd, g, axis)[0]
        n, m, m2 = bk.channel_stats(x, axis=axis)
        _, rm, rm2 = ref.channel_stats(x, axis)
        def err(a, r):
            r = np.asarray(r, np.float64)
            return float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r)))))
        e = max(err(y, ry), err(dx, rdx), err(fdx, rfdx), err(dg, rdg), err(db, rdb),
                err(mean, rmean), err(invstd, rinvstd), err(m2, rm2), err(yr, ryr),
                err(mdx, rmdx), err(mfdx, rmfdx), err(mres, gm))
        worst[np.dtype(dtype).name] = max(worst.get(np.dtype(dtype).name, 0.0), e / tol)
print(json.dumps({"isa": bk._core.isa, "worst": worst}))
"""


@pytest.mark.parametrize("isa", AVAILABLE)
def test_each_instruction_set_matches_the_reference(isa):
    env = {**os.environ, "BNKERNEL_ISA": isa}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env
    )
    result = json.loads(run.stdout)
    assert result["isa"] == isa
    # worst error as a fraction of the tolerance (float32 1e-6, float64 1e-12, relative to
    # max(1, |reference|)): below 1 means within tolerance
    for dtype, fraction in result["worst"].items():
        assert fraction < 1.0, (isa, dtype, fraction)


def test_unknown_request_keeps_the_best_copy():
    assert _chosen_isa("sse9") == BEST
