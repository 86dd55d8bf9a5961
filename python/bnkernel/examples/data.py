"""Data for the demos: concentric circles (generated here), Iris and the 8x8 digits (the copies
that ship inside scikit-learn, so nothing is downloaded), with a seeded split and standardization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Dataset", "load", "make_circles", "split_standardize"]


@dataclass
class Dataset:
    """Standardized features and integer labels, split into train and test."""

    name: str
    x_train: NDArray[Any]
    y_train: NDArray[np.int64]
    x_test: NDArray[Any]
    y_test: NDArray[np.int64]
    classes: int

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])


def make_circles(
    n: int, rng: np.random.Generator, *, noise: float = 0.1, factor: float = 0.5
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """``n`` points on two concentric circles (radius 1: label 0; radius ``factor``: label 1), at
    evenly spaced angles, shuffled, with N(0, noise^2) added to both coordinates: the recipe of
    scikit-learn's ``make_circles``, written out here so the demo needs no extra package."""
    n_outer = n // 2
    n_inner = n - n_outer
    t_out = np.linspace(0, 2 * np.pi, n_outer, endpoint=False)
    t_in = np.linspace(0, 2 * np.pi, n_inner, endpoint=False)
    x = np.concatenate(
        [
            np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
            factor * np.stack([np.cos(t_in), np.sin(t_in)], axis=1),
        ]
    )
    y = np.concatenate([np.zeros(n_outer, np.int64), np.ones(n_inner, np.int64)])
    order = rng.permutation(n)
    x = x[order] + rng.normal(0.0, noise, (n, 2))
    return x, y[order]


def split_standardize(
    name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    rng: np.random.Generator,
    *,
    test_fraction: float = 0.2,
    dtype: Any = np.float32,
) -> Dataset:
    """A seeded random split; features standardized with the training part's mean and std."""
    n = x.shape[0]
    order = rng.permutation(n)
    n_test = round(test_fraction * n)
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # constant features (some digits pixels) stay 0
    xs = (x - mean) / std
    labels = np.asarray(y, dtype=np.int64)
    return Dataset(
        name,
        xs[train].astype(dtype),
        labels[train],
        xs[test].astype(dtype),
        labels[test],
        int(labels.max()) + 1,
    )


def _sklearn_dataset(name: str) -> tuple[NDArray[Any], NDArray[Any]]:
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the {name} demo reads the data set that ships with scikit-learn: "
            'pip install "bnkernel[examples]" (or scikit-learn)'
        ) from e
    loader = {"iris": datasets.load_iris, "digits": datasets.load_digits}[name]
    bunch = loader()
    return np.asarray(bunch.data, np.float64), np.asarray(bunch.target)


def load(
    name: str, seed: int, *, n: int = 1000, noise: float = 0.1, dtype: Any = np.float32
) -> Dataset:
    """``"circles"`` (``n`` points, ``noise``), ``"iris"`` (150 x 4, 3 classes) or ``"digits"``
    (1797 x 64, 10 classes), split 80/20 under ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "circles":
        x, y = make_circles(n, rng, noise=noise)
    elif name in ("iris", "digits"):
        x, y = _sklearn_dataset(name)
    else:
        raise ValueError(f"name: expected 'circles', 'iris' or 'digits', got {name!r}")
    return split_standardize(name, x, y, rng, dtype=dtype)
