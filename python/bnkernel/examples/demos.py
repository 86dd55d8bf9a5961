"""The seed material's claims about batch normalization, run as experiments with bnkernel's
kernels in NumPy training loops (``python -m bnkernel demo ...``).

Each ``run_*`` function trains its models over several seeds and returns a JSON-able dict of
results; ``*_table`` formats one as text and ``*_plot`` draws it to a PNG (matplotlib).  Everything
is seeded: the same arguments give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .data import load
from .nn import Sigmoid
from .train import History, accuracy, make_mlp, train

Progress = Callable[[str], None]
Result = dict[str, Any]

__all__ = [
    "DEMOS",
    "run_circles",
    "run_digits",
    "run_iris",
    "run_small_batch",
]


def _noop(_: str) -> None:
    pass


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {
            "median": math.nan,
            "p25": math.nan,
            "p75": math.nan,
            "min": math.nan,
            "max": math.nan,
            "n": 0,
        }
    return {
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def _fmt(v: float, spec: str = ".3f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


# ---- concentric circles ------------------------------------------------------------------------

CIRCLES_ARCHS = {"2-3-2-1": [2, 3, 2, 1], "2-16-16-1": [2, 16, 16, 1]}


def run_circles(
    seeds: int = 10, epochs: int = 100, *, n: int = 1000, progress: Progress = _noop
) -> Result:
    """The lecture's experiment: concentric circles (``n`` points, noise 0.1, radii 1 and 0.5,
    80/20 split), a ReLU MLP trained with Adam (lr 1e-3, Keras' default) in batches of 32, with and
    without batch normalization after each hidden layer's activation (the lecture's Keras code;
    Keras' conventions), ``epochs`` epochs.  The claim: 60 % accuracy in ~20 epochs with BN, ~80
    without.  Records per epoch the training loss and the test accuracy (running statistics)."""
    runs: dict[str, dict[str, list[Any]]] = {}
    for arch, sizes in CIRCLES_ARCHS.items():
        for bn in (False, True):
            key = f"{arch} {'BN' if bn else 'plain'}"
            curves: dict[str, list[Any]] = {"loss": [], "acc": [], "epochs_to_60": []}
            for seed in range(seeds):
                data = load("circles", seed, n=n)
                model = make_mlp(sizes, bn="after" if bn else "none", convention="keras", seed=seed)
                h = train(
                    model, data, optimizer="adam", lr=1e-3, batch_size=32, epochs=epochs, seed=seed
                )
                curves["loss"].append(h.train_loss)
                curves["acc"].append(h.test_acc)
                curves["epochs_to_60"].append(h.first_epoch_reaching(0.6))
                progress(f"circles {key} seed {seed}")
            runs[key] = curves
    summary = {}
    for key, c in runs.items():
        reached = [e for e in c["epochs_to_60"] if e is not None]
        summary[key] = {
            "epochs_to_60": _stats(reached),
            "reached_60": len(reached),
            "final_acc": _stats([a[-1] for a in c["acc"]]),
        }
    return {
        "demo": "circles",
        "seeds": seeds,
        "epochs": epochs,
        "n": n,
        "runs": runs,
        "summary": summary,
    }


def circles_table(r: Result) -> str:
    lines = [
        f"Concentric circles: {r['n']} points (80/20 split), Adam 1e-3, batch 32, "
        f"{r['epochs']} epochs, {r['seeds']} seeds",
        f"{'model':<18} {'epochs to 60% test acc':>30} {'reached':>8} {'final test acc':>26}",
        f"{'':<18} {'median [p25, p75]':>30} {'':>8} {'median [min, max]':>26}",
    ]
    for key, s in r["summary"].items():
        e, a = s["epochs_to_60"], s["final_acc"]
        lines.append(
            f"{key:<18} {_fmt(e['median'], '.0f'):>12} [{_fmt(e['p25'], '.0f')}, "
            f"{_fmt(e['p75'], '.0f')}]".ljust(50)
            + f"{s['reached_60']:>3}/{r['seeds']:<4} {_fmt(a['median']):>12} "
            f"[{_fmt(a['min'])}, {_fmt(a['max'])}]"
        )
    return "\n".join(lines)


def circles_plot(r: Result, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"plain": "tab:red", "BN": "tab:blue"}
    styles = {"2-3-2-1": "-", "2-16-16-1": "--"}
    for key, c in r["runs"].items():
        arch, kind = key.split()
        for ax, name in zip(axes, ("loss", "acc"), strict=True):
            curves = np.asarray(c[name], dtype=np.float64)
            x = np.arange(1, curves.shape[1] + 1)
            med = np.median(curves, axis=0)
            ax.plot(x, med, styles[arch], color=colors[kind], label=key)
            ax.fill_between(
                x,
                np.percentile(curves, 25, axis=0),
                np.percentile(curves, 75, axis=0),
                color=colors[kind],
                alpha=0.12,
            )
    axes[0].set(xlabel="epoch", ylabel="training loss (median, IQR)", title="loss")
    axes[1].axhline(0.6, color="gray", lw=0.8)
    axes[1].set(xlabel="epoch", ylabel="test accuracy (median, IQR)", title="test accuracy")
    axes[1].legend()
    fig.suptitle(f"Concentric circles, with and without batch normalization ({r['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- iris --------------------------------------------------------------------------------------


def run_iris(seeds: int = 10, epochs: int = 50, *, progress: Progress = _noop) -> Result:
    """The notebook's experiment: Iris standardized, 80/20 split, 4-64-32-3 ReLU MLP with batch
    normalization after each hidden activation (Keras' conventions), softmax cross-entropy, Adam
    1e-3, ``epochs`` epochs in batches of 32 on the first 90 % of the training part (Keras'
    ``validation_split=0.1``).  The notebook reports a test accuracy of 0.933.  Also records the
    test accuracy with the test set's own batch statistics (train mode) next to the running ones."""
    out: dict[str, dict[str, list[float]]] = {}
    for bn in (True, False):
        key = "BN" if bn else "plain"
        res: dict[str, list[float]] = {"eval_acc": [], "train_mode_acc": []}
        for seed in range(seeds):
            data = load("iris", seed)
            model = make_mlp(
                [4, 64, 32, 3], bn="after" if bn else "none", convention="keras", seed=seed
            )
            train(
                model,
                data,
                optimizer="adam",
                lr=1e-3,
                batch_size=32,
                epochs=epochs,
                train_fraction=0.9,
                seed=seed,
            )
            res["eval_acc"].append(accuracy(model, data.x_test, data.y_test, 3))
            res["train_mode_acc"].append(
                accuracy(model, data.x_test, data.y_test, 3, train_mode=True)
            )
            progress(f"iris {key} seed {seed}")
        out[key] = res
    summary = {
        k: {"eval_acc": _stats(v["eval_acc"]), "train_mode_acc": _stats(v["train_mode_acc"])}
        for k, v in out.items()
    }
    return {"demo": "iris", "seeds": seeds, "epochs": epochs, "runs": out, "summary": summary}


def iris_table(r: Result) -> str:
    lines = [
        f"Iris: 4-64-32-3, Adam 1e-3, batch 32, {r['epochs']} epochs, {r['seeds']} seeds "
        "(the notebook: 0.933)",
        f"{'model':<8} {'test acc, running stats':>32} {'test acc, batch stats':>32}",
        f"{'':<8} {'median [min, max]':>32} {'median [min, max]':>32}",
    ]
    for key, s in r["summary"].items():
        a, b = s["eval_acc"], s["train_mode_acc"]
        lines.append(
            f"{key:<8} {_fmt(a['median']):>18} [{_fmt(a['min'])}, {_fmt(a['max'])}]"
            f" {_fmt(b['median']):>18} [{_fmt(b['min'])}, {_fmt(b['max'])}]"
        )
    return "\n".join(lines)


def iris_plot(r: Result, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (key, res) in enumerate(r["runs"].items()):
        acc = np.asarray(res["eval_acc"])
        axes[0].scatter(np.full(acc.size, i) + np.linspace(-0.15, 0.15, acc.size), acc, label=key)
    axes[0].axhline(0.9333, color="gray", lw=0.8, ls="--", label="notebook (0.933)")
    axes[0].set(
        xticks=range(len(r["runs"])),
        xticklabels=list(r["runs"]),
        ylabel="test accuracy (running statistics)",
        title="test accuracy per seed",
    )
    axes[0].legend()
    bn = r["runs"]["BN"]
    axes[1].scatter(bn["eval_acc"], bn["train_mode_acc"])
    lo = min(min(bn["eval_acc"]), min(bn["train_mode_acc"])) - 0.02
    axes[1].plot([lo, 1.0], [lo, 1.0], color="gray", lw=0.8)
    axes[1].set(
        xlabel="running statistics (eval mode)",
        ylabel="test-set batch statistics",
        title="BN model: inference vs batch statistics",
    )
    fig.suptitle(f"Iris ({r['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- digits: the paper's Figure 1 --------------------------------------------------------------

DIGITS_SIZES = [64, 100, 100, 100, 10]


def _unit_input_probe(unit: int, x: np.ndarray) -> Callable[[Any], list[float]]:
    """15th/50th/85th percentiles, over x, of the input to one sigmoid of the last hidden layer,
    with the model in inference mode (the running statistics)."""

    def probe(model: Any) -> list[float]:
        last = max(i for i, m in enumerate(model.modules) if isinstance(m, Sigmoid))
        was = model.training
        model.train(False)
        h = x
        for m in model.modules[:last]:
            h = m.forward(h)
        model.train(was)
        return [float(v) for v in np.percentile(h[:, unit], [15, 50, 85])]

    return probe


def run_digits(
    seeds: int = 3,
    steps: int = 3000,
    *,
    lr: float = 0.5,
    sweep_steps: int = 1000,
    lrs: Sequence[float] = (0.05, 0.2, 0.5, 2.0, 8.0),
    scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
    progress: Progress = _noop,
) -> Result:
    """The original paper's Figure 1 on the 8x8 digits: 64-100-100-100-10 with sigmoid hidden
    units, with and without batch normalization before each sigmoid, SGD in batches of 60.  Test
    accuracy every 50 steps, and the 15/50/85th percentiles of one last-hidden-layer sigmoid's input
    over the test set.  Then a learning-rate sweep and an initialization-scale sweep (final test
    accuracy after ``sweep_steps`` steps; a run whose loss overflows counts as diverged)."""
    every = 50
    fig1: dict[str, Any] = {}
    for bn in (False, True):
        key = "BN" if bn else "plain"
        hs: list[History] = []
        for seed in range(seeds):
            data = load("digits", seed)
            model = make_mlp(
                DIGITS_SIZES, bn="before" if bn else "none", activation="sigmoid", seed=seed
            )
            probe = _unit_input_probe(0, data.x_test) if seed == 0 else None
            hs.append(
                train(
                    model,
                    data,
                    optimizer="sgd",
                    lr=lr,
                    batch_size=60,
                    steps=steps,
                    eval_every=every,
                    seed=seed,
                    probe=probe,
                )
            )
            progress(f"digits {key} seed {seed}")
        fig1[key] = {
            "steps": hs[0].steps,
            "test_acc": [h.test_acc for h in hs],
            "percentiles": hs[0].probes,  # seed 0
            "final_acc": _stats([h.test_acc[-1] for h in hs]),
        }

    def sweep(
        values: Sequence[float],
        make_kw: Callable[[float], dict[str, Any]],
        train_kw: Callable[[float], dict[str, Any]],
        name: str,
    ) -> dict[str, Any]:
        table: dict[str, Any] = {"values": list(values)}
        for bn in (False, True):
            key = "BN" if bn else "plain"
            rows = []
            for v in values:
                accs = []
                for seed in range(seeds):
                    data = load("digits", seed)
                    model = make_mlp(
                        DIGITS_SIZES,
                        bn="before" if bn else "none",
                        activation="sigmoid",
                        seed=seed,
                        **make_kw(v),
                    )
                    h = train(
                        model,
                        data,
                        optimizer="sgd",
                        batch_size=60,
                        steps=sweep_steps,
                        eval_every=sweep_steps,
                        seed=seed,
                        **train_kw(v),
                    )
                    accs.append(math.nan if h.diverged else h.test_acc[-1])
                    progress(f"digits {name} {key} {v:g} seed {seed}")
                rows.append(
                    {
                        "acc": accs,
                        "stats": _stats(accs),
                        "diverged": sum(math.isnan(a) for a in accs),
                    }
                )
            table[key] = rows
        return table

    lr_sweep = sweep(lrs, lambda v: {}, lambda v: {"lr": v}, "lr")
    init_sweep = sweep(scales, lambda v: {"init_scale": v}, lambda v: {"lr": lr}, "init")
    return {
        "demo": "digits",
        "seeds": seeds,
        "steps": steps,
        "lr": lr,
        "every": every,
        "sweep_steps": sweep_steps,
        "figure1": fig1,
        "lr_sweep": lr_sweep,
        "init_sweep": init_sweep,
    }


def _sweep_lines(title: str, table: dict[str, Any], fmt_value: Callable[[float], str]) -> list[str]:
    lines = [title, f"{'':<8}" + "".join(f"{fmt_value(v):>16}" for v in table["values"])]
    for key in ("plain", "BN"):
        cells = []
        for row in table[key]:
            s = row["stats"]
            cell = _fmt(s["median"])
            if row["diverged"]:
                cell += f" ({row['diverged']}div)"
            cells.append(f"{cell:>16}")
        lines.append(f"{key:<8}" + "".join(cells))
    return lines


def digits_table(r: Result) -> str:
    f1 = r["figure1"]
    lines = [
        f"Digits (8x8, 1797 images, 80/20): 64-100-100-100-10 sigmoid, SGD lr {r['lr']:g}, "
        f"batch 60, {r['steps']} steps, {r['seeds']} seeds",
        f"{'model':<8} {'final test acc':>16} {'acc at step':>12}",
    ]
    probe_step = min(len(f1["plain"]["steps"]) - 1, 10)
    for key in ("plain", "BN"):
        s = f1[key]["final_acc"]
        at = float(np.median([a[probe_step] for a in f1[key]["test_acc"]]))
        lines.append(
            f"{key:<8} {_fmt(s['median']):>16} {_fmt(at):>8} @{f1[key]['steps'][probe_step]}"
        )
    lines.append(
        "last hidden layer, unit 0: input to its sigmoid over the test set "
        "(15th / 50th / 85th percentile)"
    )
    for key in ("plain", "BN"):
        p = f1[key]["percentiles"]
        picks = [0, len(p) // 4, len(p) // 2, len(p) - 1]
        cells = "  ".join(
            f"step {f1[key]['steps'][i]}: " + "/".join(f"{v:+.2f}" for v in p[i]) for i in picks
        )
        lines.append(f"  {key:<6} {cells}")
    lines += _sweep_lines(
        f"learning-rate sweep: final test acc after {r['sweep_steps']} steps (median over seeds)",
        r["lr_sweep"],
        lambda v: f"lr {v:g}",
    )
    lines += _sweep_lines(
        f"initialization-scale sweep (weights x scale), lr {r['lr']:g}",
        r["init_sweep"],
        lambda v: f"x{v:g}",
    )
    return "\n".join(lines)


def digits_plot(r: Result, path: str) -> None:
    import matplotlib.pyplot as plt

    f1 = r["figure1"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    colors = {"plain": "tab:red", "BN": "tab:blue"}
    ax = axes[0, 0]
    for key in ("plain", "BN"):
        acc = np.asarray(f1[key]["test_acc"])
        ax.plot(f1[key]["steps"], np.median(acc, axis=0), color=colors[key], label=key)
    ax.set(
        xlabel="training step",
        ylabel="test accuracy (median over seeds)",
        title="(a) test accuracy",
    )
    ax.legend()
    for ax, key, label in (
        (axes[0, 1], "plain", "(b) without BN"),
        (axes[0, 2], "BN", "(c) with BN"),
    ):
        p = np.asarray(f1[key]["percentiles"])
        steps = f1[key]["steps"]
        ax.plot(steps, p[:, 1], color=colors[key])
        ax.fill_between(steps, p[:, 0], p[:, 2], color=colors[key], alpha=0.2)
        ax.set(
            xlabel="training step",
            ylabel="sigmoid input, 15/50/85th pct",
            title=f"{label}: one last-layer unit's input",
        )
    lims = [min(a.get_ylim()[0] for a in axes[0, 1:]), max(a.get_ylim()[1] for a in axes[0, 1:])]
    for a in axes[0, 1:]:
        a.set_ylim(lims)
    for ax, table, name, xlabel in (
        (axes[1, 0], r["lr_sweep"], "(d) learning rate", "lr"),
        (axes[1, 1], r["init_sweep"], "(e) init scale", "weight scale"),
    ):
        for key in ("plain", "BN"):
            med = [row["stats"]["median"] for row in table[key]]
            ax.plot(table["values"], med, "o-", color=colors[key], label=key)
        ax.set(
            xscale="log",
            xlabel=xlabel,
            ylabel="final test accuracy (median)",
            title=name,
            ylim=(0, 1),
        )
        ax.set_xticks(table["values"], [f"{v:g}" for v in table["values"]])
        ax.minorticks_off()
        ax.legend()
    axes[1, 2].axis("off")
    fig.suptitle("Digits, after the original paper's Figure 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- small batches -----------------------------------------------------------------------------


def _renorm_schedule(model: Any) -> Callable[[int, int], None]:
    """Batch renormalization's limits relaxed as the paper does: r_max = 1 and d_max = 0 (plain
    batch normalization) while the running statistics settle, the first 5 % of the steps, then
    linearly to r_max = 3 and d_max = 5 by half-way."""

    def on_step(step: int, total: int) -> None:
        t = min(1.0, max(0.0, (step / max(total, 1) - 0.05) / 0.45))
        for b in model.batch_norms():
            b.bn.r_max = 1.0 + 2.0 * t
            b.bn.d_max = 5.0 * t

    return on_step


def run_small_batch(
    seeds: int = 3,
    epochs: int = 5,
    *,
    batch_sizes: Sequence[int] = (2, 4, 8, 32),
    progress: Progress = _noop,
) -> Result:
    """Where batch normalization degrades: the digits, 64-100-100-10 ReLU with BN before each
    ReLU (PyTorch's conventions), with Batch Renormalization there instead (r_max / d_max relaxed
    from 1 / 0 to 3 / 5 over the first half of training), or without either; Adam 1e-3, the same
    ``epochs`` at each batch size.  Reports the test accuracy with the running statistics
    (inference) and with the test set's own batch statistics: with tiny batches the statistics
    each step trains on are noisy estimates, and the running averages of them describe the
    network that inference runs poorly; renormalization trains against the running statistics
    to close that gap."""
    out: dict[str, Any] = {"batch_sizes": list(batch_sizes)}
    for key in ("plain", "BN", "renorm"):
        rows = []
        for b in batch_sizes:
            ev, tm = [], []
            for seed in range(seeds):
                data = load("digits", seed)
                model = make_mlp([64, 100, 100, 10], bn="none" if key == "plain" else "before",
                                 seed=seed, renorm=key == "renorm")  # fmt: skip
                train(
                    model, data, optimizer="adam", lr=1e-3, batch_size=b, epochs=epochs,
                    seed=seed, on_step=_renorm_schedule(model) if key == "renorm" else None,
                )  # fmt: skip
                ev.append(accuracy(model, data.x_test, data.y_test, 10))
                tm.append(accuracy(model, data.x_test, data.y_test, 10, train_mode=True))
                progress(f"small batches {key} batch {b} seed {seed}")
            rows.append(
                {"eval_acc": ev, "train_mode_acc": tm, "eval": _stats(ev), "train_mode": _stats(tm)}
            )
        out[key] = rows
    return {"demo": "smallbatch", "seeds": seeds, "epochs": epochs, **out}


def small_batch_table(r: Result) -> str:
    lines = [
        f"Small batches (digits, 64-100-100-10 ReLU, Adam 1e-3, {r['epochs']} epochs, "
        f"{r['seeds']} seeds): median test accuracy",
        f"{'batch size':<28}" + "".join(f"{b:>8}" for b in r["batch_sizes"]),
    ]
    lines.append(
        f"{'plain':<28}" + "".join(f"{_fmt(row['eval']['median']):>8}" for row in r["plain"])
    )
    lines.append(
        f"{'BN, running statistics':<28}"
        + "".join(f"{_fmt(row['eval']['median']):>8}" for row in r["BN"])
    )
    lines.append(
        f"{'BN, test-batch statistics':<28}"
        + "".join(f"{_fmt(row['train_mode']['median']):>8}" for row in r["BN"])
    )
    lines.append(
        f"{'batch renorm, running stats':<28}"
        + "".join(f"{_fmt(row['eval']['median']):>8}" for row in r["renorm"])
    )
    return "\n".join(lines)


def small_batch_plot(r: Result, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    b = r["batch_sizes"]
    curves = [  # (model, mode, style, colour, label)
        ("plain", "eval", "o-", "tab:red", "without BN"),
        ("BN", "eval", "o-", "tab:blue", "BN, inference (running statistics)"),
        ("BN", "train_mode", "o--", "tab:cyan", "BN, test-batch statistics"),
        ("renorm", "eval", "s-", "tab:green", "batch renormalization, inference"),
    ]
    for model, mode, style, colour, label in curves:
        ax.plot(b, [row[mode]["median"] for row in r[model]], style, color=colour, label=label)
    ax.set(
        xscale="log",
        xticks=b,
        xticklabels=[str(v) for v in b],
        xlabel="batch size",
        ylabel="test accuracy (median over seeds)",
        title=f"Digits: small batches ({r['epochs']} epochs each)",
    )
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# name -> (runner, table, plot, full-run kwargs, quick-run kwargs, number of training runs)
DEMOS: dict[
    str,
    tuple[
        Callable[..., Result],
        Callable[[Result], str],
        Callable[[Result, str], None],
        dict[str, Any],
        dict[str, Any],
        Callable[[dict[str, Any]], int],
    ],
] = {
    "circles": (
        run_circles,
        circles_table,
        circles_plot,
        {"seeds": 10, "epochs": 100},
        {"seeds": 3, "epochs": 20},
        lambda kw: 4 * kw["seeds"],
    ),
    "iris": (
        run_iris,
        iris_table,
        iris_plot,
        {"seeds": 10},
        {"seeds": 3, "epochs": 20},
        lambda kw: 2 * kw["seeds"],
    ),
    "digits": (
        run_digits,
        digits_table,
        digits_plot,
        {"seeds": 3},
        {"seeds": 1, "steps": 400, "sweep_steps": 200, "lrs": (0.5, 8.0), "scales": (0.1, 1.0)},
        lambda kw: (
            2 * kw["seeds"] * (1 + len(kw.get("lrs", (0,) * 5)) + len(kw.get("scales", (0,) * 5)))
        ),
    ),
    "smallbatch": (
        run_small_batch,
        small_batch_table,
        small_batch_plot,
        {"seeds": 3},
        {"seeds": 1, "epochs": 1, "batch_sizes": (2, 32)},
        lambda kw: 3 * kw["seeds"] * len(kw.get("batch_sizes", (0,) * 4)),
    ),
}
