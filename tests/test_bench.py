"""The benchmark machinery (``python -m bnkernel bench``, :mod:`bnkernel._bench`) on tiny inputs:
the table and the JSON have what they promise, a wrong kernel fails the benchmark instead of being
timed, bad options get clear messages.  Fast, and needs neither torch nor matplotlib (the tests that
use them are skipped without them)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import _bench
from bnkernel.__main__ import main

# tiny and fast: one timed sample, no minimum time, a 1 MiB copy for the bandwidth
FAST = ["--repeat", "1", "--min-time", "0", "--copy-mib", "1", "--no-torch"]


def bench(*args: str) -> int:
    return main(["bench", *FAST, *args])


def test_table_and_json(tmp_path, capsys, restore_threads):
    threads_before = bk.get_num_threads()
    path = tmp_path / "bench.json"
    rc = bench("--shapes", "4x8x3x3,16x3", "--threads", "1,2", "--json", str(path))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert bk.get_num_threads() == threads_before  # thread setting restored

    # header and table
    assert "copy bandwidth" in out and "GB/s" in out
    for column in ("shape", "layout", "dtype", "op", "bnkernel", "numpy", "torch", "passes"):
        assert column in out
    # 4-D: NCHW and NHWC; 2-D: NC only; x 2 dtypes x 4 ops x 2 thread counts
    rows = [line for line in out.splitlines() if line.startswith(("4x8x3x3", "16x3"))]
    assert len(rows) == (2 + 1) * 2 * 4 * 2
    assert sum(" NHWC " in r for r in rows) == 16 and sum(" NC " in r for r in rows) == 16
    assert "[48/48]" in err  # progress on stderr

    report = json.loads(path.read_text())
    assert set(report) >= {"config", "machine", "copy_bandwidth", "results", "definitions"}
    assert report["config"]["threads"] == [1, 2]
    assert report["machine"]["numpy"] == np.__version__
    assert [c["threads"] for c in report["copy_bandwidth"]] == [1, 2]
    assert all(c["GBps"] > 0 for c in report["copy_bandwidth"])
    results = report["results"]
    assert len(results) == 48
    assert {r["op"] for r in results} == set(_bench.OPS)
    assert {r["layout"] for r in results} == {"NCHW", "NHWC", "NC"}
    for r in results:
        bkr = r["bnkernel"]
        assert bkr["median_s"] > 0 and bkr["samples"] >= 1 and bkr["min_s"] <= bkr["median_s"]
        assert {"q1_s", "q3_s", "iqr_s", "variant"} <= set(bkr)
        assert bkr["check"]["max_rel_err"] <= bkr["check"]["tolerance"]
        assert r["numpy"]["median_s"] > 0 and r["numpy"]["check"]["max_rel_err"] < 1e-4
        assert r["torch"] is None and r["speedup_vs_torch"] is None
        assert r["speedup_vs_numpy"] == pytest.approx(r["numpy"]["median_s"] / bkr["median_s"])
        factor = 2 if r["op"].startswith("forward") else 3
        assert r["traffic_bytes"] == factor * r["bytes"]
        assert r["GBps"] == pytest.approx(r["traffic_bytes"] / bkr["median_s"] / 1e9)
        assert r["passes"] == pytest.approx(bkr["median_s"] * r["copy_GBps"] * 1e9 / r["bytes"])
    nhwc = next(r for r in results if r["layout"] == "NHWC")
    assert nhwc["stored_shape"] == "4x3x3x8" and nhwc["axis"] == -1


def test_options_subset(capsys):
    rc = bench("--shapes", "6x5x2x2", "--layouts", "nhwc", "--dtypes", "float64",
               "--ops", "backward_frozen", "--no-numpy", "--threads", "1")  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("6x5x2x2")]
    assert len(rows) == 1
    assert "NHWC" in rows[0] and "float64" in rows[0] and "backward_frozen" in rows[0]


def test_quick_defaults():
    args = _parse(["bench", "--quick"])
    config = _bench.config_from_args(args)
    assert config.shapes == _bench.QUICK_SHAPES and config.repeat == 3 and config.copy_mib == 64
    config = _bench.config_from_args(_parse(["bench"]))
    assert config.shapes == _bench.DEFAULT_SHAPES and config.threads == []
    assert (32, 256, 56, 56) in config.shapes and (64, 3) in config.shapes


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _bench.add_arguments(sub.add_parser("bench"))
    return parser.parse_args(argv)


def test_two_d_shapes_run_once(capsys):
    rc = bench("--shapes", "16x3", "--layouts", "NCHW,NHWC", "--ops", "forward_infer")
    _, err = capsys.readouterr()
    assert rc == 0
    assert "skipping 16x3" in err
    assert _bench.layouts_for((16, 3), ["NCHW", "NHWC", "NC"]) == ["NC"]
    assert _bench.layouts_for((2, 3, 4, 5), ["NCHW", "NHWC", "NC"]) == ["NCHW", "NHWC"]


# ---- a wrong kernel must fail -------------------------------------------------------------------


def test_fast_wrong_forward_fails(monkeypatch, capsys):
    """A 'kernel' that returns at once without writing its output is not timed: the run fails."""

    def do_nothing(x, gamma=None, beta=None, *, out=None, **kwargs):
        c = x.shape[kwargs.get("axis", 1)]
        return out, np.zeros(c), np.ones(c)

    monkeypatch.setattr(bk.functional, "batch_norm_forward", do_nothing)
    rc = bench("--shapes", "8x4x2x2", "--ops", "forward_infer", "--dtypes", "float64")
    out, err = capsys.readouterr()
    assert rc == 1
    assert "bnkernel forward_infer" in err and "disagrees with the float64 reference" in err
    assert "8x4x2x2" not in out  # no table row for it


@pytest.mark.parametrize("training", [True, False])
def test_slightly_wrong_backward_fails(monkeypatch, training):
    real = bk.functional.batch_norm_backward

    def off(*args, **kwargs):
        dx, dgamma, dbeta = real(*args, **kwargs)
        dx[..., 0] += np.asarray(1e-5, dtype=dx.dtype)  # a few float32 ulps on some elements
        return dx, dgamma, dbeta

    monkeypatch.setattr(bk.functional, "batch_norm_backward", off)
    op = "backward_train" if training else "backward_frozen"
    case = _bench.make_case((8, 4, 3, 3), "NCHW", np.float32)
    with pytest.raises(_bench.BenchCheckError, match=op):
        _bench.check_outputs(case, op, _bench.prepare(case, op, "bnkernel").outputs())


def test_wrong_running_stats_fail(monkeypatch):
    real = bk.functional.batch_norm_forward

    def no_update(x, gamma=None, beta=None, *, running_mean=None, running_var=None, **kw):
        return real(x, gamma, beta, **kw)  # forgets to update the running statistics

    monkeypatch.setattr(bk.functional, "batch_norm_forward", no_update)
    case = _bench.make_case((32, 5), "NC", np.float64)
    with pytest.raises(_bench.BenchCheckError, match="running_mean"):
        _bench.check_outputs(
            case, "forward_train", _bench.prepare(case, "forward_train", "bnkernel").outputs()
        )


def test_subset_check_of_large_inputs(monkeypatch):
    """Large inputs are checked on a fixed spread of channels, which still catches a wrong one."""
    monkeypatch.setattr(_bench, "FULL_CHECK_MAX_ELEMENTS", 10)
    case = _bench.make_case((4, 16, 3, 3), "NHWC", np.float32)
    channels = _bench.check_channel_subset(case)
    assert channels.size == _bench.CHECK_CHANNELS and channels[0] == 0 and channels[-1] == 15
    for op in _bench.OPS:
        result = _bench.check_outputs(case, op, _bench.prepare(case, op, "bnkernel").outputs())
        assert result["channels_checked"] == _bench.CHECK_CHANNELS
    got = _bench.prepare(case, "forward_infer", "bnkernel").outputs()
    got["y"][..., 15] += 1.0  # the last channel is in the subset
    with pytest.raises(_bench.BenchCheckError):
        _bench.check_outputs(case, "forward_infer", got)


@pytest.mark.parametrize("op", _bench.OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_numpy_textbook_is_right(op, layout):
    case = _bench.make_case((6, 5, 3, 4), layout, np.float32)
    p = _bench.prepare(case, op, "numpy")
    assert _bench.check_outputs(case, op, p.outputs(), peer=True)["max_rel_err"] < 1e-5


# ---- option errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "64", "64x0", "ax3", "64x3,", "64x-3", "2.5x3"])
def test_shape_parse_errors(text):
    with pytest.raises(ValueError, match="shape"):
        _bench.parse_shapes(text)


def test_shape_parsing():
    assert _bench.parse_shapes("32x256x56x56, 64x3") == [(32, 256, 56, 56), (64, 3)]
    assert _bench.parse_shape("4X5") == (4, 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "64"], "argument --shapes: '64' is not a shape"),
        (["--shapes", "8x3,x"], "'x' is not a shape"),
        (["--dtypes", "float16"], "unknown dtype 'float16'; choose from float32, float64"),
        (["--layouts", "NWHC"], "unknown layout 'NWHC'; choose from NCHW, NHWC, NC"),
        (["--ops", "forward"], "unknown op 'forward'"),
        (["--threads", "0"], "'0' is not a thread count"),
        (["--threads", "two"], "'two' is not a thread count"),
    ],
)
def test_cli_option_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--repeat", "0"], "--repeat"), (["--copy-mib", "0"], "--copy-mib")],
)
def test_cli_value_errors(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


# ---- plot ---------------------------------------------------------------------------------------


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    """Without matplotlib, --plot fails at once (before the long run) and says what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rc = bench("--shapes", "16x3", "--plot", str(tmp_path / "p.png"))
    out, err = capsys.readouterr()
    assert rc == 2
    assert "matplotlib" in err and "pip install 'bnkernel[bench]'" in err
    assert "16x3" not in out
    assert not (tmp_path / "p.png").exists()


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    rc = bench("--shapes", "4x8x3x3,16x3", "--threads", "1", "--plot", str(path))
    assert rc == 0, capsys.readouterr().err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- timing and bandwidth -----------------------------------------------------------------------


def test_time_call_counts():
    calls = []
    timing = _bench.time_call(lambda: calls.append(1), repeat=5, min_time=0.0)
    assert len(timing.times) >= 5
    assert len(calls) >= 1 + len(timing.times) * timing.number  # warm-up + timed
    assert timing.number > 1  # a trivial call is timed in batches
    assert timing.min <= timing.median


def test_time_call_caps_slow_peers():
    timing = _bench.time_call(lambda: sum(range(20000)), repeat=1000, min_time=0.0, max_time=0.0)
    assert len(timing.times) == 3


def test_copy_bandwidth():
    for threads in (1, 2):
        bw = _bench.copy_bandwidth(threads, 1 << 20, repeat=3)
        assert bw.nbytes == 1 << 20 and bw.gbps > 0
        assert bw.to_json()["GBps"] == bw.gbps


# ---- torch peer (skipped without torch) ---------------------------------------------------------


@pytest.mark.parametrize("op", _bench.OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("out_kernels", [True, False], ids=["out", "allocating"])
def test_torch_peer(op, layout, out_kernels, monkeypatch):
    torch = pytest.importorskip("torch")
    if not out_kernels:
        monkeypatch.setattr(_bench, "_has_cpu_kernel", lambda torch, name: False)
    shape = (32, 6) if layout == "NC" else (4, 6, 3, 5)
    case = _bench.make_case(shape, layout, np.float32)
    p = _bench.prepare(case, op, "torch", torch)
    assert _bench.check_outputs(case, op, p.outputs(), peer=True)["max_rel_err"] < 1e-5
    if not out_kernels:
        assert "allocates" in p.variant
    elif op.startswith("forward"):
        assert "preallocated" in p.variant  # torch has a real out= kernel for the forward
    if layout == "NHWC":
        xt = _bench._to_torch(torch, case.x, True)
        assert xt.shape == (4, 6, 3, 5) and xt.is_contiguous(memory_format=torch.channels_last)
