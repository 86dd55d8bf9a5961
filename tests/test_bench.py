"""The benchmark machinery (``python -m bnkernel bench``, :mod:`bnkernel._bench`) on tiny inputs:
the table and the JSON have what they promise, a wrong kernel fails the benchmark instead of being
timed, bad options get clear messages.  Fast, and needs neither torch nor matplotlib (the tests that
use them are skipped without them)."""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import bench as _bench
from bnkernel.__main__ import main
from bnkernel.bench import accuracy, machine, peers

# tiny and fast: one timed sample, no minimum time, a 1 MiB copy for the bandwidth
FAST = ["--repeat", "1", "--min-time", "0", "--copy-mib", "1", "--no-torch"]


def bench(*args: str) -> int:
    return main(["bench", *FAST, *args])


def test_table_and_json(tmp_path, capsys, restore_threads):
    threads_before = bk.get_num_threads()
    path = tmp_path / "bench.json"
    rc = bench(
        "--shapes", "4x8x3x3,16x3", "--threads", "1,2", "--dtypes", "float32,float64",
        "--json", str(path),
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert bk.get_num_threads() == threads_before  # thread setting restored

    # header and table
    assert "memory bandwidth" in out and "copy" in out and "read" in out and "write" in out
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
    for c in report["copy_bandwidth"]:
        assert c["GBps"] > 0 and c["read_GBps"] > 0 and c["write_GBps"] > 0
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
        # passes against the copy of x itself, at the row's thread count, measured in this run
        assert r["passes"] == pytest.approx(bkr["median_s"] * r["copy_GBps"] * 1e9 / r["bytes"])
        assert r["copy_GBps"] == pytest.approx(2 * r["bytes"] / r["copy"]["median_s"] / 1e9)
        lo, hi = r["passes_range"]
        assert lo <= r["passes"] <= hi
        assert lo == pytest.approx(bkr["min_s"] * r["copy_GBps"] * 1e9 / r["bytes"])
        assert hi == pytest.approx(bkr["max_s"] * r["copy_GBps"] * 1e9 / r["bytes"])
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
    monkeypatch.setattr(accuracy, "FULL_CHECK_MAX_ELEMENTS", 10)
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
        (
            ["--dtypes", "int8"],
            "unknown dtype 'int8'; choose from float32, float64, float16, bfloat16",
        ),
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


def test_time_calls_interleaves_rounds():
    """Functions timed together take their samples in the same rounds, the order rotated from
    round to round (so a slow period of the machine slows them alike), each until it has enough:
    the slower one stops first, the faster one goes on alone."""
    order = []

    def fn(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)  # over 1 ms: one warm-up call, one call a sample

        return call

    # (b, 30x longer, is done after its 4 samples; a needs about 60: a margin no load overturns)
    timings = _bench.time_calls({"a": fn("a", 0.001), "b": fn("b", 0.03)}, repeat=4, min_time=0.06)
    a, b = timings["a"], timings["b"]
    assert a.number == b.number == 1  # both long enough to time one call at a time
    assert len(a.times) >= 4 and len(b.times) >= 4
    assert sum(b.times) >= 0.06 and sum(a.times) >= 0.06
    assert len(a.times) > len(b.times)  # b reached min_time in fewer samples
    timed = order[2:]  # after each one's warm-up call
    rounds = [timed[2 * k : 2 * k + 2] for k in range(4)]
    assert rounds == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert set(timed[2 * len(b.times) :]) == {"a"}  # a alone once b is done


def test_copy_bandwidth(restore_threads):
    for threads in (1, 2):
        bw = _bench.copy_bandwidth(threads, 1 << 20, repeat=3)
        assert bw.nbytes == 1 << 20 and bw.gbps > 0
        assert bw.read_gbps is not None and bw.read_gbps > 0
        assert bw.write_gbps is not None and bw.write_gbps > 0
        j = bw.to_json()
        assert j["GBps"] == bw.gbps and j["read_GBps"] == bw.read_gbps
        assert "memory_pass" in j["method"]


def test_half_precision_rows(tmp_path, capsys):
    """float16 (and bfloat16 with ml_dtypes) rows: checked against the reference at half an ulp of
    their dtype, float32 parameters; the NumPy textbook is not run on them."""
    dtypes = ["float16"] + (["bfloat16"] if _has_ml_dtypes() else [])
    path = tmp_path / "bench.json"
    rc = bench("--shapes", "4x8x3x3", "--dtypes", ",".join(dtypes), "--json", str(path))
    out, err = capsys.readouterr()
    assert "float16" in out
    assert rc == 0, err
    results = json.loads(path.read_text())["results"]
    assert {r["dtype"] for r in results} == set(dtypes)
    assert len(results) == len(dtypes) * 2 * 4  # NCHW and NHWC, 4 ops
    for r in results:
        assert r["numpy"] is None
        chk = r["bnkernel"]["check"]
        bound = 2.0**-11 if r["dtype"] == "float16" else 2.0**-8
        assert chk["tolerance"] == bound
        assert chk["max_rel_err"] <= bound
        assert chk["outputs"]["y" if r["op"].startswith("forward") else "dx"] > 0  # rounded once


def _has_ml_dtypes() -> bool:
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


def test_half_precision_case_parameters_are_float32():
    case = _bench.make_case((4, 6, 3, 5), "NHWC", np.float16)
    assert case.x.dtype == np.float16 and case.x.shape == (4, 3, 5, 6)
    for a in (case.gamma, case.beta, case.running_mean, case.running_var):
        assert a.dtype == np.float32
    with pytest.raises(ValueError, match="expected one of"):
        _bench.make_case((4, 6), "NC", np.int32)


# ---- torch peer (skipped without torch) ---------------------------------------------------------


@pytest.mark.parametrize("op", _bench.OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("out_kernels", [True, False], ids=["out", "allocating"])
def test_torch_peer(op, layout, out_kernels, monkeypatch):
    torch = pytest.importorskip("torch")
    if not out_kernels:
        monkeypatch.setattr(peers, "_has_cpu_kernel", lambda torch, name: False)
    shape = (32, 6) if layout == "NC" else (4, 6, 3, 5)
    case = _bench.make_case(shape, layout, np.float32)
    p = _bench.prepare(case, op, "torch", torch)
    assert _bench.check_outputs(case, op, p.outputs(), peer=True)["max_rel_err"] < 1e-5
    if not out_kernels:
        assert "allocates" in p.variant
    elif op.startswith("forward"):
        assert "preallocated" in p.variant  # torch has a real out= kernel for the forward
    if layout == "NHWC":
        xt = peers._to_torch(torch, case.x, True)
        assert xt.shape == (4, 6, 3, 5) and xt.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", _bench.OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_peer_half_precision(op, layout, dtype):
    """torch on 16-bit data with float32 parameters (its mixed-type kernels), viewed without a copy
    (bfloat16: ml_dtypes' bits as torch.bfloat16), within the peers' loose tolerance."""
    torch = pytest.importorskip("torch")
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    case = _bench.make_case((4, 6, 3, 5), layout, dtype)
    p = _bench.prepare(case, op, "torch", torch)
    outs = p.outputs()
    assert all(a.dtype == case.dtype for k, a in outs.items() if k in ("y", "dx"))
    err = _bench.check_outputs(case, op, outs, peer=True)["max_rel_err"]
    assert err <= accuracy.PEER_TOLERANCE[case.dtype]
    xt = peers._to_torch(torch, case.x, layout == "NHWC")
    assert xt.data_ptr() == case.x.ctypes.data  # a view, not a copy


def test_a_case_torch_cannot_run_leaves_its_column_empty(monkeypatch, restore_threads):
    """torch raising on a case (a dtype or layout it has no kernel for) is recorded in the row, not
    a failed benchmark; bnkernel's own result is still checked and timed."""
    from types import SimpleNamespace

    from bnkernel.bench import measure as measure_mod

    real_prepare = measure_mod.prepare

    def prepare(case, op, impl, torch=None):
        if impl == "torch":
            raise RuntimeError("no CPU kernel for this case\nsecond line")
        return real_prepare(case, op, impl, torch)

    monkeypatch.setattr(measure_mod, "prepare", prepare)
    fake_torch = SimpleNamespace(set_num_threads=lambda n: None)
    case = _bench.make_case((4, 6, 3, 5), "NCHW", np.float32)
    config = measure_mod.BenchConfig(repeat=1, min_time=0.0)
    bw = _bench.copy_bandwidth(1, 1 << 16, repeat=1)
    row = measure_mod.measure(case, "forward_train", 1, config, fake_torch, bw)
    assert row["torch"] is None and row["speedup_vs_torch"] is None
    assert row["torch_error"] == "RuntimeError: no CPU kernel for this case"
    assert row["bnkernel"]["check"]["max_rel_err"] <= row["bnkernel"]["check"]["tolerance"]


# ---- size sweep ---------------------------------------------------------------------------------

SWEEP_FAST = ["--sweep", "--sweep-max", "64K", "--repeat", "1", "--min-time", "0.001",
              "--copy-mib", "1", "--no-torch", "--threads", "1"]  # fmt: skip


def _fake_caches(root, entries):
    """A sysfs-like cache directory: entries of (level, type, size)."""
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


def test_sweep_table_and_json(tmp_path, monkeypatch, capsys, restore_threads):
    caches = [(1, "Data", "8K"), (1, "Instruction", "32K"), (2, "Unified", "16K"),
              (3, "Unified", "32K")]  # fmt: skip
    monkeypatch.setattr(machine, "CACHE_SYSFS", _fake_caches(tmp_path / "cache", caches))
    path = tmp_path / "sweep.json"
    rc = main(["bench", *SWEEP_FAST, "--layouts", "NCHW,NHWC", "--ops",
               "forward_train,backward_train", "--json", str(path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "size sweep" in out and "caches (cpu0): L1d 8 KiB, L2 16 KiB, L3 32 KiB" in out
    for column in ("size", "shape", "bnkernel", "ns/B", "GB/s", "passes", "ratio"):
        assert column in out
    assert "torch" not in out.split("\n\n", 1)[1] and "numpy" not in out.split("\n\n", 1)[1]
    for line in ("----- L1d 8 KiB", "----- L2 16 KiB", "----- L3 32 KiB"):
        assert out.count(line) == 4  # once per series: 2 layouts x 2 ops
    assert "forward_train, NHWC, float32, 1 thread" in out
    assert "[20/20]" in err  # progress on stderr: 5 sizes x 2 layouts x 2 ops

    report = json.loads(path.read_text())
    sizes = report["sweep"]["sizes"]
    assert sizes == [4096 << i for i in range(5)]  # 4 KiB doubling to 64 KiB
    assert report["sweep"]["baseline_above_bytes"] == 16 << 10
    assert [c["name"] for c in report["caches"]] == ["L1d", "L2", "L3"]
    assert report["config"]["sweep"] is True and report["config"]["numpy"] is False
    results = report["results"]
    assert len(results) == 20
    series = report["sweep"]["series"]
    assert len(series) == 4 and all(s["baseline_bytes"] == [32 << 10, 64 << 10] for s in series)
    for s in series:
        rows = sorted(
            (r for r in results if (r["op"], r["layout"]) == (s["op"], s["layout"])),
            key=lambda r: r["bytes"],
        )
        assert [r["bytes"] for r in rows] == sizes
        base = float(np.median([r["ns_per_byte"] for r in rows[-2:]]))
        assert s["baseline_ns_per_byte"]["bnkernel"] == pytest.approx(base)
        assert [r["cache"] for r in rows] == ["L1d", "L1d", "L2", "L3", "memory"]
        for r in rows:
            n, c, h, w = map(int, r["shape"].split("x"))
            assert c == 64 and h == w and n * c * h * w * 4 == r["bytes"]
            t = r["bnkernel"]["median_s"]
            assert r["ns_per_byte"] == pytest.approx(t / r["bytes"] * 1e9)
            assert r["ns_per_element"] == pytest.approx(4 * r["ns_per_byte"])
            assert r["cost_ratio"] == pytest.approx(r["ns_per_byte"] / base)
            assert r["bnkernel"]["cost_ratio"] == r["cost_ratio"]
            assert r["bnkernel"]["check"]["max_rel_err"] <= r["bnkernel"]["check"]["tolerance"]
            assert r["numpy"] is None and r["torch"] is None
            assert r["GBps"] > 0 and r["passes"] > 0


def test_sweep_without_cache_info(tmp_path, monkeypatch, capsys):
    """No cache sizes known: nothing marked, ratios against the largest size (none past 1 MiB)."""
    monkeypatch.setattr(machine, "CACHE_SYSFS", str(tmp_path / "missing"))
    config = _bench.BenchConfig(
        dtypes=["float64"], ops=["forward_infer"], layouts=["NCHW"], threads=[1], repeat=1,
        min_time=0.0, numpy=True, torch=False, copy_mib=1, sweep=True, sweep_max=16 << 10,
    )  # fmt: skip
    report = _bench.run_sweep(config)
    out = capsys.readouterr().out
    assert report["caches"] == [] and "unknown" in out and "-----  " not in out
    assert "ratio: ns/B / the ns/B of the largest size" in out
    rows = report["results"]
    assert [r["shape"] for r in rows] == ["2x64x2x2", "1x64x4x4", "2x64x4x4"]  # float64 sizes
    assert rows[-1]["cost_ratio"] == 1.0 and rows[-1]["numpy"]["cost_ratio"] == 1.0
    assert "numpy" in out and "vs numpy" in out  # --numpy: the textbook is timed too


def test_sweep_sizes_and_shapes():
    sizes = _bench.sweep_sizes()
    assert sizes == [(4 << 10) << i for i in range(19)]  # 4 KiB doubling to 1 GiB
    for dtype in (np.float32, np.float64):
        itemsize = np.dtype(dtype).itemsize
        for n in sizes:
            shape = _bench.sweep_shape(n, dtype)
            assert shape[1] == 64 and shape[2] == shape[3] <= 64
            assert math.prod(shape) * itemsize == n
            if n >= 64 * 64 * 64 * itemsize:
                assert shape[2:] == (64, 64)  # past 1 MiB (float32): only N grows
    assert _bench.sweep_shape(1 << 30) == (1024, 64, 64, 64)
    with pytest.raises(ValueError, match="power of two"):
        _bench.sweep_shape(3 << 12)


def test_parse_size():
    assert _bench.parse_size("4096") == 4096
    assert _bench.parse_size("64K") == _bench.parse_size("64KiB") == 64 << 10
    assert _bench.parse_size("256m") == _bench.parse_size("256 MB") == 256 << 20
    assert _bench.parse_size("1G") == 1 << 30
    assert _bench.parse_size("1.5M") == 3 << 19
    for bad in ("", "abc", "1X", "-4K", "0", "0.3", "1..5M", "K"):
        with pytest.raises(ValueError, match="is not a size"):
            _bench.parse_size(bad)


def test_cache_sizes(tmp_path):
    entries = [(1, "Instruction", "64K"), (1, "Data", "48K"), (2, "Unified", "2048K"),
               (3, "Unified", "36M")]  # fmt: skip
    root = _fake_caches(tmp_path / "c", entries)
    caches = _bench.cache_sizes(root)
    assert [(c.name, c.nbytes) for c in caches] == [("L1d", 48 << 10), ("L2", 2 << 20),
                                                    ("L3", 36 << 20)]  # fmt: skip
    assert _bench.fits_in(4 << 20, caches) == "L3" and _bench.fits_in(64 << 20, caches) == "memory"
    assert _bench.baseline_threshold(caches) == (2 << 20, "L2 (2 MiB)")
    (tmp_path / "c" / "index3" / "size").write_text("garbage\n")  # unreadable entries are skipped
    assert [c.name for c in _bench.cache_sizes(root)] == ["L1d", "L2"]
    assert _bench.cache_sizes(str(tmp_path / "nowhere")) == []
    assert _bench.baseline_threshold([])[0] == _bench.ASSUMED_L2_BYTES


def test_sweep_defaults():
    config = _bench.config_from_args(_parse(["bench", "--sweep"]))
    assert config.sweep and config.sweep_min == 4 << 10 and config.sweep_max == 1 << 30
    assert config.layouts == ["NCHW"] and config.dtypes == ["float32"]
    assert config.ops == list(_bench.OPS) and config.numpy is False and config.torch is True
    assert config.max_time == _bench.SWEEP_MAX_TIME_S
    config = _bench.config_from_args(_parse(["bench", "--sweep", "--numpy", "--sweep-max", "256M"]))
    assert config.numpy is True and config.sweep_max == 256 << 20
    config = _bench.config_from_args(_parse(["bench"]))
    assert not config.sweep and config.numpy is True and config.max_time is None
    assert config.layouts == list(_bench.LAYOUTS) and config.dtypes == list(_bench.DTYPES)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "'abc' is not a size: expected a whole number of bytes"),
        ("0", "'0' is not a size"),
        ("3M", "'3M' (3145728 bytes) is not a power of two"),
        ("2K", "'2K' (2048 bytes) is too small: the sweep starts at 4K"),
    ],
)
def test_sweep_max_parse_errors(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--sweep", "--sweep-max", value])
    assert e.value.code == 2
    assert f"argument --sweep-max: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sweep", "--sweep-min", "64K", "--sweep-max", "16K"],
         "--sweep-min 64 KiB is larger than --sweep-max 16 KiB"),
        (["--sweep-max", "1G"], "--sweep-max only applies with --sweep"),
        (["--numpy"], "--numpy only applies with --sweep"),
        (["--sweep", "--numpy", "--no-numpy"], "contradict"),
        (["--sweep", "--shapes", "8x3"], "--shapes does not apply to --sweep"),
        (["--sweep", "--layouts", "NC"], "choose --layouts NCHW and/or NHWC"),
        (["--sweep", "--sweep-max", "64T"], "of memory"),
    ],
)  # fmt: skip
def test_sweep_config_errors(args, message, capsys):
    assert main(["bench", "--no-torch", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and "bench: error:" in err
    assert "ns/B" not in out  # failed before timing anything


def test_sweep_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    rc = main(["bench", *SWEEP_FAST, "--sweep-max", "16K", "--ops", "forward_infer",
               "--plot", str(path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floors_script_reports_every_kernel_beside_its_floors(capsys, restore_threads):
    """benchmarks/floors.py (tiny): per thread count a copy and a read, then for each layout the
    four kernels, each with its passes and its memory and arithmetic floors.  (At 2 MiB the data
    sit in cache, where a read can take 0.00 passes to two decimals: the floors are only >= 0.)"""
    import importlib.util
    import pathlib
    import re

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "floors.py"
    spec = importlib.util.spec_from_file_location("floors", path)
    assert spec is not None and spec.loader is not None
    floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floors)
    assert floors.main(["--mib", "2", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\d thread\(s\): a copy [\d.]+ ms = 2 passes, a read [\d.]+ passes$",
                          out, re.M)) == 2  # fmt: skip
    for layout in ("NCHW", "channels-last"):
        lines = [ln for ln in out.splitlines() if ln.strip().startswith(layout + ":")]
        assert len(lines) == 2, out
        for line in lines:
            cells = re.findall(r"([a-z ]+) ([\d.]+) \(([\d.]+), ([\d.]+)\)", line.split(":", 1)[1])
            names = [c[0].strip() for c in cells]
            assert names == ["statistics", "inference", "training forward", "training backward"]
            assert all(float(c[1]) > 0 and float(c[2]) >= 0 and float(c[3]) >= 0 for c in cells)
    with pytest.raises(SystemExit):
        floors.main(["--mib", "0"])


def test_plot_lines_are_per_layout_and_dtype_with_the_tables_names(monkeypatch, tmp_path):
    """One line per implementation, layout (named as the table names it) and dtype: float32 and
    float64 never share a line, and channels-last is "NHWC" in both."""
    pytest.importorskip("matplotlib")
    from bnkernel.bench import cases, plot

    assert cases.layout_name(6, False) == "NCS4" and cases.layout_name(6, True) == "NS4C"
    rows = []
    for layout, axis in (("NCHW", 1), ("NHWC", -1), ("NC", 1)):
        for dtype in ("float32", "float64"):
            for nbytes in (1 << 12, 1 << 14):
                rows.append({
                    "op": "forward_train", "layout": layout, "axis": axis, "dtype": dtype,
                    "threads": 1, "bytes": nbytes, "bnkernel": {"median_s": nbytes * 1e-9},
                })  # fmt: skip
    report = {"results": rows, "copy_bandwidth": [{"threads": 1, "GBps": 10.0}],
              "machine": {"bnkernel": "x", "cpu": "y"}}  # fmt: skip
    seen: dict[str, list[str]] = {}

    def capture(fig, axes, used, title, path):
        seen["labels"] = [ln.get_label() for ln in axes[0].get_lines()]

    monkeypatch.setattr(plot, "_save", capture)
    plot.plot_report(report, str(tmp_path / "p.png"))
    labels = [lb for lb in seen["labels"] if lb.startswith("bnkernel")]
    assert sorted(labels) == sorted(
        f"bnkernel {lo} {dt}" for lo in ("NC", "NCHW", "NHWC") for dt in ("float32", "float64")
    )


# ---- bench --torch-block ------------------------------------------------------------------------


def test_torch_block_table_and_json(tmp_path, capsys, restore_threads):
    pytest.importorskip("torch")
    path = tmp_path / "block.json"
    rc = main(["bench", "--torch-block", "--shapes", "2x4x6x6", "--threads", "1", "--repeat", "1",
               "--min-time", "0", "--json", str(path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "ResNet basic block" in out and "2x4x6x6" in out and "ch_last" in out
    rows = json.loads(path.read_text())["torch_block"]
    assert [(r["layout"], r["threads"]) for r in rows] == [("NCHW", 1), ("channels_last", 1)]
    for r in rows:
        assert set(r["block_ms"]) == {"torch", "bnkernel", "bnkernel fused", "no BN"}
        assert all(v > 0 for v in r["block_ms"].values())
        assert math.isclose(r["bn_steps_speedup"], r["bn_steps_ms"]["torch"]
                            / r["bn_steps_ms"]["bnkernel"])  # fmt: skip


def test_torch_block_check_catches_a_wrong_batch_norm(monkeypatch, capsys):
    """A bnkernel.torch forward that is off (here: the output scaled) fails the run before any
    timing, with exit status 1."""
    pytest.importorskip("torch")
    import bnkernel.torch as bt

    real = bt._BatchNormFunction.forward

    def off(ctx, *args):
        return real(ctx, *args) * 1.1

    monkeypatch.setattr(bt._BatchNormFunction, "forward", staticmethod(off))
    rc = main(["bench", "--torch-block", "--shapes", "2x4x6x6", "--threads", "1", "--repeat", "1",
               "--min-time", "0", "--layouts", "NCHW"])  # fmt: skip
    assert rc == 1
    assert "differs from torch's" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sweep"], "--sweep does not apply to --torch-block"),
        (["--dtypes", "float64"], "--dtypes does not apply to --torch-block"),
        (["--shapes", "8x16"], "--torch-block takes (N, C, H, W) shapes"),
        (["--layouts", "NC"], "the layouts are NCHW and NHWC"),
    ],
)
def test_torch_block_option_errors(args, message, capsys):
    pytest.importorskip("torch")
    assert main(["bench", "--torch-block", *args]) == 2
    assert message in capsys.readouterr().err
