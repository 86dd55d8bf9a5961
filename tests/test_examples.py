"""The demos' training-loop toolkit (bnkernel.examples) and short runs of each demo.

The toolkit is checked piece by piece (gradients against central finite differences in float64,
the optimizers against their update formulas, the batching, the data); the demos are run with
fewer seeds and epochs than the full ones and must show the outcome their full runs report.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from bnkernel.examples import data as D
from bnkernel.examples import demos, nn
from bnkernel.examples.train import accuracy, make_mlp, train

try:
    import sklearn  # noqa: F401

    HAVE_SKLEARN = True
except ImportError:  # pragma: no cover
    HAVE_SKLEARN = False

needs_sklearn = pytest.mark.skipif(
    not HAVE_SKLEARN, reason="the Iris and digits demos read scikit-learn's copies of the data"
)


# ---- gradients -----------------------------------------------------------------------------------


def _loss_and_grads(model, loss_fn, x, target):
    z = model.forward(x)
    loss = loss_fn.forward(z, target)
    dx = model.backward(loss_fn.backward())
    return loss, dx, [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize(
    "sizes,activation,bn",
    [
        ([3, 5, 4, 1], "relu", "after"),
        ([3, 5, 4, 1], "sigmoid", "before"),
        ([3, 6, 3], "relu", "before"),
        ([3, 6, 5, 4], "sigmoid", "none"),
    ],
    ids=["bce-relu-bn-after", "bce-sigmoid-bn-before", "softmax-relu-bn-before", "softmax-plain"],
)
def test_training_loop_gradients_match_finite_differences(sizes, activation, bn):
    """Every parameter's gradient and dL/dx, through Dense, the activations, bnkernel's batch
    normalization (batch statistics) and the loss, against central differences in float64.  The
    step h = 1e-6 leaves a truncation error ~h^2 and a rounding error ~1e-16 / h = 1e-10 relative
    to the loss; 1e-6 relative to the gradient's scale is far above both and far below any
    wrong term."""
    rng = np.random.default_rng(5)
    model = make_mlp(sizes, bn=bn, activation=activation, seed=3, dtype=np.float64)
    # move gamma and beta off 1 and 0 so that their gradients are exercised in general position
    for p in model.parameters():
        if p.name in ("gamma", "beta"):
            p.value[...] = rng.uniform(0.5, 1.5, p.value.shape)
    x = rng.standard_normal((7, sizes[0]))
    classes = sizes[-1] if sizes[-1] > 1 else 2
    if classes == 2:
        loss_fn: Any = nn.BCEWithLogits()
        target = rng.integers(0, 2, 7).astype(np.float64)
    else:
        loss_fn = nn.SoftmaxCrossEntropy()
        target = rng.integers(0, classes, 7)
    loss, dx, grads = _loss_and_grads(model, loss_fn, x, target)
    assert math.isfinite(loss)
    h = 1e-6

    def numeric(array: np.ndarray) -> np.ndarray:
        g = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + h
            up = loss_fn.forward(model.forward(x), target)
            array[i] = old - h
            down = loss_fn.forward(model.forward(x), target)
            array[i] = old
            g[i] = (up - down) / (2 * h)
        return g

    for p, g in zip(model.parameters(), grads, strict=True):
        num = numeric(p.value)
        scale = max(1e-3, float(np.max(np.abs(num))))
        assert np.max(np.abs(g - num)) <= 1e-6 * scale, p.name
    num_dx = numeric(x)
    assert np.max(np.abs(dx - num_dx)) <= 1e-6 * max(1e-3, float(np.max(np.abs(num_dx))))


def test_losses_against_direct_formulas():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 1)) * 3
    y = np.array([0, 1, 1, 0, 1, 0], dtype=np.float64)
    p = 1 / (1 + np.exp(-z[:, 0]))
    want = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert nn.BCEWithLogits().forward(z, y) == pytest.approx(want, rel=1e-12)
    # no overflow or log(0) for huge logits
    big = nn.BCEWithLogits().forward(np.array([[1000.0], [-1000.0]]), np.array([0.0, 1.0]))
    assert big == pytest.approx(1000.0)
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    e = np.exp(logits)
    want_ce = -np.mean(np.log(e[np.arange(5), labels] / e.sum(axis=1)))
    assert nn.SoftmaxCrossEntropy().forward(logits, labels) == pytest.approx(want_ce, rel=1e-12)


# ---- optimizers ----------------------------------------------------------------------------------


def test_adam_follows_its_update_rule():
    value = np.array([1.0, -2.0])
    grad = np.zeros(2)
    opt = nn.Adam([nn.Param("w", value, grad)], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-7)
    m = np.zeros(2)
    v = np.zeros(2)
    w = value.copy()
    for t, g in enumerate([np.array([0.5, -1.0]), np.array([0.2, 0.3]), np.array([-1.0, 2.0])], 1):
        grad[...] = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-7)
        np.testing.assert_allclose(value, w, rtol=1e-14)


def test_sgd_with_and_without_momentum():
    value = np.array([1.0])
    grad = np.array([2.0])
    nn.SGD([nn.Param("w", value, grad)], lr=0.1).step()
    assert value[0] == pytest.approx(0.8)
    value = np.array([1.0])
    opt = nn.SGD([nn.Param("w", value, grad)], lr=0.1, momentum=0.5)
    opt.step()  # v = -0.2
    opt.step()  # v = 0.5 * -0.2 - 0.2 = -0.3
    assert value[0] == pytest.approx(0.5)


# ---- batches and data ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch", [(64, 32), (65, 32), (66, 32), (5, 2), (3, 32)])
def test_minibatches_cover_everything_and_never_give_a_single_example(n, batch):
    for rng in (None, np.random.default_rng(1)):
        parts = list(nn.minibatches(n, batch, rng))
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert all(p.size >= 2 for p in parts)
        assert all(p.size <= batch + 1 for p in parts)


def test_make_circles():
    x, y = D.make_circles(400, np.random.default_rng(0), noise=0.0, factor=0.5)
    r = np.hypot(x[:, 0], x[:, 1])
    np.testing.assert_allclose(r[y == 0], 1.0)
    np.testing.assert_allclose(r[y == 1], 0.5)
    assert (y == 0).sum() == (y == 1).sum() == 200
    x2, y2 = D.make_circles(400, np.random.default_rng(0), noise=0.1)
    x3, y3 = D.make_circles(400, np.random.default_rng(0), noise=0.1)
    np.testing.assert_array_equal(x2, x3)
    np.testing.assert_array_equal(y2, y3)


def test_split_standardizes_with_the_training_part():
    ds = D.load("circles", 3, n=500)
    assert ds.x_train.shape == (400, 2) and ds.x_test.shape == (100, 2)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, atol=1e-5)
    assert ds.classes == 2


def test_training_is_deterministic_under_a_seed():
    def run() -> list[float]:
        ds = D.load("circles", 1, n=300)
        model = make_mlp([2, 8, 1], bn="after", seed=1)
        return train(model, ds, epochs=3, seed=1).train_loss

    assert run() == run()


def test_accuracy_in_train_mode_leaves_the_running_statistics_alone():
    ds = D.load("circles", 2, n=300)
    model = make_mlp([2, 8, 8, 1], bn="before", seed=2)
    train(model, ds, epochs=2, seed=2)
    before = [b.running_state() for b in model.batch_norms()]
    accuracy(model, ds.x_test, ds.y_test, 2, train_mode=True)
    after = [b.running_state() for b in model.batch_norms()]
    for (m0, v0, n0), (m1, v1, n1) in zip(before, after, strict=True):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)
        assert n0 == n1


# ---- the demos, short --------------------------------------------------------------------------


def test_circles_batch_norm_trains_faster():
    """The lecture's claim, at a fixed budget of 20 epochs over 5 seeds: the 2-3-2-1 network with
    batch normalization has a higher median test accuracy than without."""
    r = demos.run_circles(seeds=5, epochs=20)
    s = r["summary"]
    assert s["2-3-2-1 BN"]["final_acc"]["median"] > s["2-3-2-1 plain"]["final_acc"]["median"]
    assert s["2-16-16-1 BN"]["final_acc"]["median"] >= s["2-16-16-1 plain"]["final_acc"]["median"]
    assert s["2-3-2-1 BN"]["reached_60"] >= s["2-3-2-1 plain"]["reached_60"]


@needs_sklearn
def test_iris_reaches_the_notebooks_accuracy_and_modes_agree():
    r = demos.run_iris(seeds=3, epochs=50)
    bn = r["summary"]["BN"]
    assert bn["eval_acc"]["median"] >= 0.9
    # after training, inference (running statistics) and the test set's own batch statistics
    # classify alike
    for a, b in zip(r["runs"]["BN"]["eval_acc"], r["runs"]["BN"]["train_mode_acc"], strict=True):
        assert abs(a - b) <= 0.1


@needs_sklearn
def test_digits_batch_norm_trains_faster_and_keeps_the_unit_input_stable():
    r = demos.run_digits(seeds=1, steps=400, sweep_steps=200, lrs=(0.5, 8.0), scales=(0.1, 1.0))
    f1 = r["figure1"]
    assert f1["BN"]["final_acc"]["median"] > f1["plain"]["final_acc"]["median"]
    # the BN network tolerates the highest rate of the sweep far better than the plain one
    assert r["lr_sweep"]["BN"][1]["stats"]["median"] > 0.8
    plain_high = r["lr_sweep"]["plain"][1]
    assert plain_high["diverged"] or plain_high["stats"]["median"] < 0.5
    # percentiles recorded at every evaluation, in order 15 <= 50 <= 85
    for p in f1["BN"]["percentiles"]:
        assert p[0] <= p[1] <= p[2]


@needs_sklearn
def test_small_batches_degrade_batch_norm():
    r = demos.run_small_batch(seeds=1, epochs=3, batch_sizes=(2, 32))
    bn_small, bn_large = r["BN"]
    assert bn_small["eval"]["median"] < bn_large["eval"]["median"] - 0.05
    # batch renormalization recovers part of what batches of two lose
    assert r["renorm"][0]["eval"]["median"] > bn_small["eval"]["median"] + 0.02


def test_demo_command_writes_results(tmp_path, capsys):
    from bnkernel.__main__ import main

    out = tmp_path / "demo"
    assert (
        main(["demo", "circles", "--quick", "--seeds", "2", "--no-progress", "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "Concentric circles" in text and "2-3-2-1 BN" in text
    results = json.loads((out / "results.json").read_text())
    assert results["circles"]["seeds"] == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "circles.png").stat().st_size > 10_000


def test_demo_command_rejects_unknown_names(capsys):
    from bnkernel.__main__ import main

    assert main(["demo", "mnist", "--no-progress"]) == 2
    assert "unknown mnist" in capsys.readouterr().err


def test_example_script_trains():
    """bnkernel.examples.train_circles, the training loop written out in full, learns the
    circles."""
    from bnkernel.examples import train_circles

    assert train_circles.main(epochs=30) > 0.85


def test_demo_results_are_repeatable():
    """Same arguments, same numbers: every random draw in a demo comes from its seeds."""
    a = demos.run_circles(seeds=2, epochs=5)
    b = demos.run_circles(seeds=2, epochs=5)
    assert json.dumps(a["runs"]) == json.dumps(b["runs"])


def test_demo_without_scikit_learn_says_what_to_install_before_running(tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    """Without the [examples] extra, `demo` (all) stops at once with one line, instead of running
    the circles and dying in a traceback at the Iris demo."""
    import importlib.util

    from bnkernel.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))  # fmt: skip
    assert main(["demo", "--no-progress", "--out", str(tmp_path / "d")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and 'pip install "bnkernel[examples]"' in err[0], err
    assert "iris, digits, smallbatch" in err[0]
    assert captured.out == ""  # (nothing ran)


def test_check_covers_every_path_and_dtype(capsys):
    """`check` times the plain forward / backward, then holds every kernel path, in every data
    dtype, to its bound against the float64 reference."""
    from bnkernel import coverage
    from bnkernel.__main__ import main

    assert main(["check", "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    for name, _ in coverage.PATHS:
        for dtype in ("float32", "float64", "float16"):
            assert any(ln.startswith(f"{name:<27} {dtype} ") for ln in text.splitlines()), (
                name, dtype,
            )  # fmt: skip
    assert "FAILED" not in text and text.rstrip().endswith("all results within tolerance")


def test_check_piped_into_head_ends_quietly():
    """`python -m bnkernel check | head -3`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    with subprocess.Popen([sys.executable, "-m", "bnkernel", "check", "--repeat", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # (the reader goes away, as head does)
        err = proc.stderr.read().decode()
        proc.wait(timeout=300)
    assert first.startswith(b"bnkernel ")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141
