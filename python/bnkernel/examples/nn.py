"""A small NumPy neural-network toolkit for the demos: dense layers, activations, losses,
optimizers, and bnkernel's :class:`~bnkernel.BatchNorm`, composed in a :class:`Sequential`.

Every module has ``forward(x)`` and ``backward(dy)``; ``backward`` returns dL/dx and *overwrites*
the gradients of the module's parameters (there is no accumulation, so no ``zero_grad``).
``parameters()`` lists :class:`Param` objects, each a value array and its gradient array, which the
optimizers update in place.  ``train()`` / ``eval()`` switch every batch-normalization layer between
batch statistics and running statistics.

The arrays are (batch, features); the dtype is the model's (float32 by default, float64 for the
gradient checks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..layer import BatchNorm, Convention

Array = NDArray[Any]

__all__ = [
    "SGD",
    "Adam",
    "BCEWithLogits",
    "BatchNorm1d",
    "Dense",
    "Module",
    "Param",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "minibatches",
    "sigmoid",
]


@dataclass
class Param:
    """A trainable array and its gradient (same shape and dtype)."""

    name: str
    value: Array
    grad: Array


class Module:
    """Base class: identity forward/backward, no parameters."""

    training = True

    def forward(self, x: Array) -> Array:
        return x

    def backward(self, dy: Array) -> Array:
        return dy

    def parameters(self) -> list[Param]:
        return []

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)


Init = Literal["he", "glorot"]


class Dense(Module):
    """``y = x @ W + b``.  ``init="he"`` draws W from N(0, 2 / n_in) (for ReLU layers),
    ``"glorot"`` from U(+-sqrt(6 / (n_in + n_out))) (sigmoid and output layers); ``scale``
    multiplies either (the initialization-sensitivity sweep of the digits demo)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        rng: np.random.Generator,
        *,
        init: Init = "he",
        scale: float = 1.0,
        bias: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        if init == "he":
            w = rng.normal(0.0, math.sqrt(2.0 / n_in), (n_in, n_out))
        elif init == "glorot":
            limit = math.sqrt(6.0 / (n_in + n_out))
            w = rng.uniform(-limit, limit, (n_in, n_out))
        else:
            raise ValueError(f"init: expected 'he' or 'glorot', got {init!r}")
        self.W = (scale * w).astype(dtype)
        self.b = np.zeros(n_out, dtype) if bias else None
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b) if self.b is not None else None
        self._x: Array | None = None

    def forward(self, x: Array) -> Array:
        self._x = x
        y: Array = x @ self.W
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy: Array) -> Array:
        if self._x is None:
            raise RuntimeError("Dense.backward: call forward first")
        np.matmul(self._x.T, dy, out=self.dW)
        if self.db is not None:
            np.sum(dy, axis=0, out=self.db)
        dx: Array = dy @ self.W.T
        return dx

    def parameters(self) -> list[Param]:
        params = [Param("W", self.W, self.dW)]
        if self.b is not None and self.db is not None:
            params.append(Param("b", self.b, self.db))
        return params


class ReLU(Module):
    def forward(self, x: Array) -> Array:
        self._mask = x > 0
        y: Array = np.where(self._mask, x, 0).astype(x.dtype, copy=False)
        return y

    def backward(self, dy: Array) -> Array:
        dx: Array = np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)
        return dx


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    y: Array = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
    return y


class Sigmoid(Module):
    def forward(self, x: Array) -> Array:
        self._y = sigmoid(x)
        return self._y

    def backward(self, dy: Array) -> Array:
        dx: Array = dy * self._y * (1 - self._y)
        return dx


class BatchNorm1d(Module):
    """bnkernel's :class:`~bnkernel.BatchNorm` over the features of a (batch, features) array,
    as a module: train mode normalizes with the batch statistics and updates the running ones,
    eval mode uses the running ones.  ``renorm=True`` is Batch Renormalization (its ``r_max`` and
    ``d_max`` are ``self.bn.r_max`` / ``self.bn.d_max``)."""

    def __init__(
        self,
        num_features: int,
        *,
        convention: Convention = "torch",
        momentum: float | None = None,
        dtype: Any = np.float32,
        renorm: bool = False,
    ) -> None:
        kw: dict[str, Any] = {} if momentum is None else {"momentum": momentum}
        self.bn = BatchNorm(
            num_features, axis=1, convention=convention, dtype=dtype, renorm=renorm, **kw
        )

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        self.bn.train(mode)
        return self

    def forward(self, x: Array) -> Array:
        return self.bn.forward(x)

    def backward(self, dy: Array) -> Array:
        dx: Array = self.bn.backward(dy)
        return dx

    def parameters(self) -> list[Param]:
        return [
            Param("gamma", self.bn.params["gamma"], self.bn.grads["gamma"]),
            Param("beta", self.bn.params["beta"], self.bn.grads["beta"]),
        ]

    def running_state(self) -> tuple[Array, Array, int]:
        """Copies of (running_mean, running_var, num_batches_tracked)."""
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        return self.bn.running_mean.copy(), self.bn.running_var.copy(), self.bn.num_batches_tracked

    def set_running_state(self, state: tuple[Array, Array, int]) -> None:
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        self.bn.running_mean[...] = state[0]
        self.bn.running_var[...] = state[1]
        self.bn.num_batches_tracked = state[2]


class Sequential(Module):
    """Modules applied in order; backward in reverse."""

    def __init__(self, *modules: Module) -> None:
        self.modules = list(modules)

    def forward(self, x: Array) -> Array:
        for m in self.modules:
            x = m.forward(x)
        return x

    def backward(self, dy: Array) -> Array:
        for m in reversed(self.modules):
            dy = m.backward(dy)
        return dy

    def parameters(self) -> list[Param]:
        return [p for m in self.modules for p in m.parameters()]

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        for m in self.modules:
            m.train(mode)
        return self

    def batch_norms(self) -> list[BatchNorm1d]:
        return [m for m in self.modules if isinstance(m, BatchNorm1d)]


# ---- losses ------------------------------------------------------------------------------------


class BCEWithLogits:
    """Binary cross-entropy of ``sigmoid(z)`` against 0/1 labels, averaged over the batch, computed
    from the logits z (batch, 1) so that it never takes log(0)."""

    def forward(self, z: Array, y: Array) -> float:
        z = z.reshape(-1)
        self._z, self._y = z, y.astype(z.dtype)
        # log(1 + exp(-|z|)) + max(z, 0) - z * y
        loss = np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0) - z * self._y
        return float(np.mean(loss, dtype=np.float64))

    def backward(self) -> Array:
        n = self._z.shape[0]
        dz: Array = ((sigmoid(self._z) - self._y) / n).reshape(-1, 1)
        return dz


class SoftmaxCrossEntropy:
    """Cross-entropy of ``softmax(z)`` against integer labels, averaged over the batch."""

    def forward(self, z: Array, labels: Array) -> float:
        shifted = z - z.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self._p = np.exp(log_p)
        self._labels = labels
        rows = np.arange(z.shape[0])
        return float(-np.mean(log_p[rows, labels], dtype=np.float64))

    def backward(self) -> Array:
        n = self._p.shape[0]
        g = self._p.copy()
        g[np.arange(n), self._labels] -= 1
        dz: Array = g / n
        return dz


# ---- optimizers --------------------------------------------------------------------------------


class SGD:
    """``v = momentum * v - lr * grad;  value += v`` (plain SGD with momentum 0)."""

    def __init__(self, params: Sequence[Param], lr: float, momentum: float = 0.0) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self._v = [np.zeros_like(p.value) for p in self.params]

    def step(self) -> None:
        for p, v in zip(self.params, self._v, strict=True):
            if self.momentum:
                v *= self.momentum
                v -= self.lr * p.grad
                p.value += v
            else:
                p.value -= self.lr * p.grad


class Adam:
    """Adam (Kingma & Ba 2015) with Keras' default epsilon:
    ``m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    value -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``."""

    def __init__(
        self,
        params: Sequence[Param],
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-7,
    ) -> None:
        self.params = list(params)
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self._m = [np.zeros_like(p.value) for p in self.params]
        self._v = [np.zeros_like(p.value) for p in self.params]

    def step(self) -> None:
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for p, m, v in zip(self.params, self._m, self._v, strict=True):
            m *= self.beta1
            m += (1.0 - self.beta1) * p.grad
            v *= self.beta2
            v += (1.0 - self.beta2) * p.grad * p.grad
            p.value -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.value.dtype)


# ---- batches -----------------------------------------------------------------------------------


def minibatches(
    n: int, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[NDArray[np.intp]]:
    """Index arrays covering range(n) in batches of ``batch_size`` (shuffled when ``rng`` is
    given).  A last batch of a single example is folded into the one before it: batch
    normalization cannot train on one value per channel."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[s:end]


def all_parameters(modules: Iterable[Module]) -> list[Param]:
    return [p for m in modules for p in m.parameters()]
