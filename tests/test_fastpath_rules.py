"""The compiled fast path never accepts a call that the argument layer refuses, and where it accepts
one it computes what the checked path computes, bit for bit (outputs and every array written).

Hypothesis draws calls from a space of plain and abusive arguments: dtypes, lengths, scalar types
and ranges (``momentum`` outside [0, 1], ``training="False"``, NaN eps), axes, and memory shared
between any two of the arrays (a running statistic that is a row of x, gamma, the other running
statistic, or part of ``out``; ``out`` that is x, a saved statistic, read-only or strided).  Each
drawn call is built twice, in two separate but identical worlds: the fast path runs in one
(``_core.forward_fast`` / ``_core.backward_fast``), the public function with the fast path off in
the other.  If the fast path declines, it must have written nothing; if it accepts, the checked path
must accept too and leave its world identical.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import _core
from bnkernel import functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# derandomized (CI repeats the same examples); fewer under the sanitizers, more to explore
for _name, _examples in (("rules-ci", 400), ("rules-sanitize", 80), ("rules-explore", 5000)):
    settings.register_profile(
        _name, max_examples=_examples, deadline=None, derandomize=_name != "rules-explore",
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
RULES = settings.get_profile(
    {"sanitize": "rules-sanitize", "explore": "rules-explore"}.get(
        os.environ.get("HYPOTHESIS_PROFILE", ""), "rules-ci"
    )
)

C = 3
SHAPES = [(4, C), (2, C, 5), (1, C), (5, C, 1), (2, 2, C)]

# what each argument may be: a plain value first, then abuse
RUNNING = [
    "none",
    "plain",
    "row-of-x",
    "is-gamma",
    "is-other",
    "in-out",
    "read-only",
    "f32",
    "long",
]
PARAMS = ["none", "plain", "f32", "long", "list", "in-out"]
OUTS = ["none", "fresh", "is-x", "read-only", "strided", "f32", "is-dy", "holds-mean"]
SCALARS = {
    "momentum": [0.1, 0.0, 1.0, -0.1, 1.5, float("nan"), 1, np.float64(0.3), None],
    "eps": [1e-5, 0.0, -1e-5, float("inf"), 1, np.float32(1e-3)],
    "training": [True, False, 1, 0, "False", np.True_, None],
    "unbiased": [True, False, 1, "yes"],
    "axis": [1, -1, 0, 5, np.int64(1)],
}


def pick(draw: Any, options: list[Any], plain: int = 1) -> int:
    """The index of one of `options`, a plain one (the first `plain`) about 5 times in 6: the calls
    must be plain often enough for the property to compare results, not only declines."""
    i = draw(st.integers(0, 6 * len(options) - 1))
    return i if i < len(options) else i % plain


@st.composite
def calls(draw: Any) -> dict[str, Any]:
    return {
        "op": draw(st.sampled_from(["forward", "backward"])),
        "shape": draw(st.sampled_from(SHAPES)),
        "dtype": draw(st.sampled_from([np.float16, np.float32, np.float64])),
        "seed": draw(st.integers(0, 2**16)),
        "rm": RUNNING[pick(draw, RUNNING, 2)],
        "rv": RUNNING[pick(draw, RUNNING, 2)],
        "gamma": PARAMS[pick(draw, PARAMS, 2)],
        "beta": PARAMS[pick(draw, PARAMS, 2)],
        "out": OUTS[pick(draw, OUTS, 2)],
        **{k: pick(draw, v, 2) for k, v in SCALARS.items()},
    }


def build(d: dict[str, Any]) -> dict[str, Any]:
    """One world: every array of the call, memory shared as drawn, and the call's arguments."""
    rng = np.random.default_rng(d["seed"])
    dt = np.dtype(d["dtype"])
    pdt = np.dtype(np.float32) if dt == np.float16 else dt  # the parameters' dtype
    shape = d["shape"]
    scalar = {k: SCALARS[k][d[k]] for k in SCALARS}
    ax = scalar["axis"] % len(shape) if isinstance(scalar["axis"], (int, np.integer)) else 1
    ax = ax if -len(shape) <= scalar["axis"] < len(shape) else 1
    nC = shape[ax]
    x = rng.standard_normal(shape).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    out_base = np.zeros(shape, dt)
    world: dict[str, Any] = {"x": x, "dy": dy, "out_base": out_base}

    def param(kind: str, fill: float) -> Any:
        if kind == "none":
            return None
        if kind == "plain":
            return rng.uniform(0.5, 1.5, nC).astype(pdt) * fill
        if kind == "f32":  # another dtype than the parameters'
            return np.full(nC, fill, np.float32 if pdt == np.float64 else np.float64)
        if kind == "long":
            return np.full(nC + 1, fill, pdt)
        if kind == "list":
            return [fill] * nC
        flat = out_base.reshape(-1)  # in-out: the first values of out's memory
        return flat[:nC] if flat.size >= nC else None

    world["gamma"] = param(d["gamma"], 1.0)
    world["beta"] = param(d["beta"], 0.0)

    def running(kind: str, other: Any, fill: float) -> Any:
        if kind == "row-of-x":
            flat = x.reshape(-1)
            return flat[:nC] if flat.size >= nC else None
        if kind == "is-gamma":
            return world["gamma"]
        if kind == "is-other":
            return other
        if kind == "read-only":
            a = np.full(nC, fill, pdt)
            a.flags.writeable = False
            return a
        if kind in ("plain",):
            return rng.uniform(0.5, 1.5, nC).astype(pdt)
        return param(kind, fill)

    world["rm"] = running(d["rm"], None, 0.0)
    world["rv"] = running(d["rv"], world["rm"], 1.0)
    mean = rng.standard_normal(nC)
    invstd = rng.uniform(0.5, 2.0, nC)
    world["mean"], world["invstd"] = mean, invstd
    kind = d["out"]
    out: Any = None
    if kind == "fresh":
        out = out_base
    elif kind == "is-x":
        out = x
    elif kind == "is-dy":
        out = dy
    elif kind == "read-only":
        out = out_base
        out.flags.writeable = False
    elif kind == "strided":
        out = np.zeros((*shape[:-1], 2 * shape[-1]), dt)[..., ::2]
    elif kind == "f32":
        out = np.zeros(shape, np.float32 if dt == np.float64 else np.float64)
    elif kind == "holds-mean" and out_base.size >= nC and dt == np.float64:
        out = out_base
        out.reshape(-1)[:nC] = mean
        world["mean"] = out.reshape(-1)[:nC]
    world["out"] = out
    world["scalar"] = scalar
    return world


def arrays_of(world: dict[str, Any]) -> list[np.ndarray]:
    keys = ["x", "dy", "out_base", "gamma", "beta", "rm", "rv", "mean", "invstd", "out"]
    return [world[k] for k in keys if isinstance(world[k], np.ndarray)]


def run_fast(d: dict[str, Any], w: dict[str, Any]) -> Any:
    s = w["scalar"]
    if d["op"] == "forward":
        return _core.forward_fast(
            w["x"], w["gamma"], w["beta"], w["rm"], w["rv"], s["training"], s["momentum"],
            s["eps"], s["axis"], s["unbiased"], w["out"],
        )  # fmt: skip
    return _core.backward_fast(
        w["dy"], w["x"], w["mean"], w["invstd"], w["gamma"], s["training"], s["axis"], w["out"]
    )


def run_checked(d: dict[str, Any], w: dict[str, Any]) -> Any:
    s = w["scalar"]
    F._FAST_PATH = False
    try:
        if d["op"] == "forward":
            return bk.batch_norm_forward(
                w["x"], w["gamma"], w["beta"], running_mean=w["rm"], running_var=w["rv"],
                training=s["training"], momentum=s["momentum"], eps=s["eps"], axis=s["axis"],
                running_var_unbiased=s["unbiased"], out=w["out"],
            )  # fmt: skip
        return bk.batch_norm_backward(
            w["dy"], w["x"], w["mean"], w["invstd"], w["gamma"], training=s["training"],
            axis=s["axis"], out=w["out"],
        )  # fmt: skip
    finally:
        F._FAST_PATH = True


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@RULES
@given(calls())
def test_fast_path_accepts_only_what_the_checked_path_accepts(d: dict[str, Any]) -> None:
    fast_world, checked_world = build(d), build(d)
    before = [a.copy() for a in arrays_of(fast_world)]
    got = run_fast(d, fast_world)
    if got is None:  # declined: nothing written
        for a, b in zip(arrays_of(fast_world), before, strict=True):
            assert same_bits(a, b)
        return
    want = run_checked(d, checked_world)  # must not raise: the fast path accepted the call
    for g, w in zip(got, want, strict=True):
        assert same_bits(np.asarray(g), np.asarray(w))
    for a, b in zip(arrays_of(fast_world), arrays_of(checked_world), strict=True):
        assert same_bits(a, b)


def test_the_space_reaches_both_outcomes() -> None:
    """The drawn space holds plain calls (taken) and abusive ones (declined), so the property above
    checks both sides (a fast path that always declined would pass it vacuously)."""
    plain = {"op": "forward", "shape": (4, C), "dtype": np.float32, "seed": 0, "rm": "plain",
             "rv": "plain", "gamma": "plain", "beta": "plain", "out": "fresh",
             **{k: 0 for k in SCALARS}}  # fmt: skip
    assert run_fast(plain, build(plain)) is not None
    for change in ({"rm": "row-of-x"}, {"rv": "is-other"}, {"rm": "is-gamma"}, {"momentum": 4},
                   {"training": 4}, {"out": "is-x"}):  # fmt: skip
        assert run_fast({**plain, **change}, build({**plain, **change})) is None, change
    backward = {**plain, "op": "backward", "out": "holds-mean", "dtype": np.float64}
    assert run_fast(backward, build(backward)) is None
