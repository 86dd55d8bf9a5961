"""Building and training the demo models: MLPs with or without batch normalization, a training loop
that records what the demos plot, and accuracy in either batch-normalization mode."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..layer import Convention
from .data import Dataset
from .nn import (
    SGD,
    Adam,
    BatchNorm1d,
    BCEWithLogits,
    Dense,
    Init,
    Module,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    minibatches,
)

Array = NDArray[Any]
BNPlace = Literal["none", "before", "after"]

__all__ = ["History", "accuracy", "make_mlp", "predict", "train"]


def make_mlp(
    sizes: Sequence[int],
    *,
    bn: BNPlace,
    activation: Literal["relu", "sigmoid"] = "relu",
    convention: Convention = "torch",
    init_scale: float = 1.0,
    seed: int = 0,
    dtype: Any = np.float32,
    renorm: bool = False,
) -> Sequential:
    """Dense layers of ``sizes`` (inputs first, outputs last) with ``activation`` between them and,
    per ``bn``, a batch-normalization layer after each hidden Dense (``"before"`` the activation, as
    in the paper) or after each hidden activation (``"after"``, as the Keras code of the seed
    material does), never after the output layer; ``renorm=True`` makes them Batch
    Renormalization layers."""
    rng = np.random.default_rng(seed)
    init: Init = "he" if activation == "relu" else "glorot"
    modules: list[Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        modules.append(
            Dense(n_in, n_out, rng, init="glorot" if last else init, scale=init_scale, dtype=dtype)
        )
        if last:
            break
        act: Module = ReLU() if activation == "relu" else Sigmoid()
        if bn == "before":
            modules += [BatchNorm1d(n_out, convention=convention, dtype=dtype, renorm=renorm), act]
        elif bn == "after":
            modules += [act, BatchNorm1d(n_out, convention=convention, dtype=dtype, renorm=renorm)]
        else:
            modules.append(act)
    return Sequential(*modules)


def _loss(classes: int) -> BCEWithLogits | SoftmaxCrossEntropy:
    return BCEWithLogits() if classes == 2 else SoftmaxCrossEntropy()


def predict(model: Module, x: Array, classes: int) -> NDArray[np.int64]:
    z = model.forward(x)
    if classes == 2:
        return (z.reshape(-1) > 0).astype(np.int64)
    return np.asarray(np.argmax(z, axis=1), dtype=np.int64)


def accuracy(
    model: Sequential, x: Array, y: Array, classes: int, *, train_mode: bool = False
) -> float:
    """Accuracy with the running statistics (``train_mode=False``, inference) or with the batch's
    own statistics (``train_mode=True``: x is normalized as one batch; the running statistics are
    left as they were)."""
    bns = model.batch_norms()
    saved = [b.running_state() for b in bns]
    was_training = model.training
    model.train(train_mode)
    try:
        return float(np.mean(predict(model, x, classes) == y))
    finally:
        for b, s in zip(bns, saved, strict=True):
            b.set_running_state(s)
        model.train(was_training)


@dataclass
class History:
    """What a training run recorded at each evaluation point."""

    steps: list[int] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    train_loss: list[float] = field(
        default_factory=list
    )  # mean over the batches since the last point
    test_acc: list[float] = field(default_factory=list)  # inference mode (running statistics)
    probes: list[Any] = field(default_factory=list)  # whatever the probe callback returned
    diverged: bool = False

    def first_epoch_reaching(self, level: float) -> float | None:
        for e, a in zip(self.epochs, self.test_acc, strict=True):
            if a >= level:
                return e
        return None


def train(
    model: Sequential,
    data: Dataset,
    *,
    optimizer: Literal["adam", "sgd"] = "adam",
    lr: float = 1e-3,
    momentum: float = 0.0,
    batch_size: int = 32,
    epochs: int | None = None,
    steps: int | None = None,
    eval_every: int = 0,
    train_fraction: float = 1.0,
    seed: int = 0,
    probe: Callable[[Sequential], Any] | None = None,
    on_eval: Callable[[], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> History:
    """Minibatch training of ``model`` on ``data.x_train``.

    Runs ``epochs`` epochs, or ``steps`` optimizer steps (then epochs are fractional).  Evaluates
    every epoch, or every ``eval_every`` steps when that is given: the mean training loss since the
    last evaluation, the test accuracy in inference mode, and ``probe(model)`` if given.
    ``train_fraction`` < 1 trains on the first part of the training set only (Keras'
    ``validation_split`` holds the rest out the same way).  ``on_step(step, total_steps)`` runs
    before each optimizer step (a schedule, e.g. batch renormalization's r_max / d_max).  A loss
    that becomes NaN or infinite stops the run and marks it ``diverged``.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("train: give exactly one of epochs and steps")
    x = data.x_train
    y = data.y_train
    if train_fraction < 1.0:
        keep = round(train_fraction * x.shape[0])
        x, y = x[:keep], y[:keep]
    loss_fn = _loss(data.classes)
    target: Array = y.astype(x.dtype) if data.classes == 2 else y
    params = model.parameters()
    opt: Adam | SGD = (
        Adam(params, lr=lr) if optimizer == "adam" else SGD(params, lr=lr, momentum=momentum)
    )
    rng = np.random.default_rng(seed + 7919)
    history = History()
    n = x.shape[0]
    total_steps = steps if steps is not None else None
    step = 0
    epoch = 0
    losses: list[float] = []

    def evaluate() -> None:
        history.steps.append(step)
        history.epochs.append(step * batch_size / n if steps is not None else float(epoch))
        history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        history.test_acc.append(accuracy(model, data.x_test, data.y_test, data.classes))
        if probe is not None:
            history.probes.append(probe(model))
        losses.clear()
        if on_eval is not None:
            on_eval()

    batches_per_epoch = len(list(minibatches(n, batch_size)))
    planned = steps if steps is not None else (epochs or 0) * batches_per_epoch
    model.train()
    if probe is not None or eval_every:
        evaluate()  # the starting point
    while True:
        for idx in minibatches(n, batch_size, rng):
            if on_step is not None:
                on_step(step, planned)
            z = model.forward(x[idx])
            loss = loss_fn.forward(z, target[idx])
            if not np.isfinite(loss):
                history.diverged = True
                model.train()
                return history
            losses.append(loss)
            model.backward(loss_fn.backward())
            opt.step()
            step += 1
            if eval_every and step % eval_every == 0:
                evaluate()
            if total_steps is not None and step >= total_steps:
                if not eval_every or step % eval_every:
                    evaluate()
                return history
        epoch += 1
        if not eval_every:
            evaluate()
        if epochs is not None and epoch >= epochs:
            return history
