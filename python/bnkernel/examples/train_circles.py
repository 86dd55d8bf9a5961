"""A NumPy training loop with bnkernel's batch normalization, start to finish.

The lecture's concentric-circles model, 2 -> 3 -> 2 -> 1 with ReLU, trained with Adam in batches of
32, with a BatchNorm after each hidden layer's activation (as the lecture's Keras code places it),
then evaluated with the running statistics.  Run it with

    python -m bnkernel.examples.train_circles

It uses the small toolkit in bnkernel.examples (Dense, ReLU, BatchNorm1d, Sequential, the loss,
Adam); `python -m bnkernel demo circles` runs the full experiment over many seeds.
"""

from __future__ import annotations

import numpy as np

from bnkernel.examples.data import load
from bnkernel.examples.nn import (
    Adam,
    BatchNorm1d,
    BCEWithLogits,
    Dense,
    ReLU,
    Sequential,
    minibatches,
)


def main(epochs: int = 40, seed: int = 0) -> float:
    data = load("circles", seed, n=1000)
    rng = np.random.default_rng(seed)
    model = Sequential(
        Dense(2, 3, rng), ReLU(), BatchNorm1d(3, convention="keras"),
        Dense(3, 2, rng), ReLU(), BatchNorm1d(2, convention="keras"),
        Dense(2, 1, rng, init="glorot"),
    )  # fmt: skip
    loss_fn = BCEWithLogits()
    optimizer = Adam(model.parameters(), lr=1e-3)
    targets = data.y_train.astype(np.float32)
    for epoch in range(1, epochs + 1):
        model.train()  # batch statistics; the running ones are updated as we go
        losses = []
        for idx in minibatches(len(data.x_train), 32, rng):
            logits = model.forward(data.x_train[idx])
            losses.append(loss_fn.forward(logits, targets[idx]))
            model.backward(loss_fn.backward())  # fills every parameter's gradient
            optimizer.step()
        model.eval()  # inference: the running statistics
        predicted = (model.forward(data.x_test).reshape(-1) > 0).astype(np.int64)
        accuracy = float(np.mean(predicted == data.y_test))
        if epoch % 10 == 0 or epoch == 1:
            print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
