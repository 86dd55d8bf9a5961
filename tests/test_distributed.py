"""bnkernel.distributed over MPI: each scenario of tests/mpi_worker.py runs under
``mpiexec -n 2`` and ``-n 3`` (every rank compares itself with the single-process result on the
whole batch: uneven parts, empty ranks, every layout and axis kind, float32 to 1e-6 and float64 to
1e-12, statistics and gradients identical on every rank).  Skipped, with the reason, when mpi4py
or mpiexec is missing (CI installs both: mpi4py and mpich are test extras)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
TIMEOUT = 120  # seconds; a scenario takes one or two


def _mpiexec() -> str | None:
    # the mpich wheel puts mpiexec beside the interpreter of its environment
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

needs_mpi = pytest.mark.skipif(
    not HAVE_MPI4PY or MPIEXEC is None,
    reason="needs mpi4py and an MPI with mpiexec (pip install mpi4py mpich)",
)


def run(n: int, scenario: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """The scenario under mpiexec; a job still running after `timeout` (a hang) fails the test."""
    assert MPIEXEC is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # n ranks on 2 cores
    try:
        return subprocess.run(
            [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", WORKER, scenario],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{scenario} with {n} processes hung (killed after {timeout} s): {e.stderr!r}")


SCENARIOS = [
    "consistency", "fused_and_masked", "layer", "four_collectives", "total_of_one",
    "bad_argument", "sums", "masked_nan_padding", "device", "torch_tensors",
]  # fmt: skip

# One rank's arguments are wrong or disagree with the others': every rank must raise the same
# PeerError (naming the rank and why) with nothing written, and none may hang (the timeout fails
# the test).
DISAGREEMENTS = [
    "channels_differ", "dtypes_differ", "bad_out_forward", "bad_out_backward", "gelu_on_one_rank",
    "axis_out_of_range", "not_an_array", "settings_differ", "layer_wrong_input", "sums_disagree",
]  # fmt: skip


@needs_mpi
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("n", [2, 3])
def test_scenario(n, scenario):
    if scenario == "torch_tensors":
        pytest.importorskip("torch")
    proc = run(n, scenario)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["scenario"] == scenario and result["size"] == n
    if "checked" in result:
        assert result["checked"] > 0


@needs_mpi
@pytest.mark.parametrize("scenario", DISAGREEMENTS)
@pytest.mark.parametrize("n", [2, 3])
def test_every_rank_raises_the_same_peer_error(n, scenario):
    proc = run(n, scenario, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"scenario": scenario, "size": n, "raised": True}


@needs_mpi
def test_one_process_is_the_plain_kernels():
    proc = run(1, "consistency")
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_a_rank_that_raises_ends_the_job(n):
    """Rank 1 raises outside any synchronized call while the others enter a collective: under
    `python -m mpi4py` the job aborts at once, non-zero, instead of the others waiting."""
    start = time.monotonic()
    proc = run(n, "uncaught")
    assert proc.returncode != 0
    assert "rank 1 fails on its own" in proc.stderr
    assert time.monotonic() - start < TIMEOUT / 4


def test_import_bnkernel_never_imports_mpi4py():
    code = "import sys, bnkernel; bnkernel.BatchNorm(2); assert 'mpi4py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_distributed_without_mpi4py_says_what_to_install():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "try:\n    import bnkernel.distributed\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'bnkernel[mpi]'" in out.stdout


EXAMPLE = ["-m", "bnkernel.examples.train_distributed"]


@needs_mpi
def test_example_reaches_the_single_process_weights(tmp_path):
    """bnkernel.examples.train_distributed with 2 and 3 processes ends with the weights and running
    statistics of one process training plain BatchNorm on the whole batches (float64: to
    rounding, 1e-12 after 3 epochs of Adam)."""
    assert MPIEXEC is not None
    plain = tmp_path / "plain.npz"
    subprocess.run([sys.executable, *EXAMPLE, "--plain", "--epochs", "3", "--out", str(plain)],
                   check=True, capture_output=True, timeout=TIMEOUT)  # fmt: skip
    want = dict(np.load(plain))
    for n in (2, 3):
        path = tmp_path / f"n{n}.npz"
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *EXAMPLE, "--epochs", "3",
               "--out", str(path)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"({n} processes)" in proc.stdout
        got = dict(np.load(path))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)


@needs_mpi
def test_overhead_benchmark_runs(tmp_path):
    """benchmarks/bench_distributed.py (its quick sizes): a row per size, the exchanges (and the
    headers among them) timed apart from the kernels."""
    assert MPIEXEC is not None
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "bench_distributed.py")
    out = tmp_path / "sync.json"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", script, "--quick", "--repeats", "3",
           "--json", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["kernels_ms"] > 0 and row["exchanges_ms"] > 0 and row["sync_step_ms"] > 0
        assert 0 < row["headers_ms"]
        # per direction a 48-byte header and 2C doubles
        assert row["bytes_per_rank"] == 2 * 48 + 8 * (4 * row["channels"])
