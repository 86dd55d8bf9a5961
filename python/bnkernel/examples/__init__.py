"""The seed experiments: NumPy training loops with and without batch normalization.

``python -m bnkernel demo circles|iris|digits|smallbatch|all`` runs them (``pip install
"bnkernel[examples]"`` brings scikit-learn for the Iris and digits data, tqdm for progress bars and
matplotlib for the plots).  The pieces are small and meant to be read:

* :mod:`bnkernel.examples.nn` -- Dense, ReLU, Sigmoid, bnkernel's BatchNorm as a module,
  Sequential, the losses, SGD and Adam;
* :mod:`bnkernel.examples.data` -- concentric circles, Iris, digits; split and standardization;
* :mod:`bnkernel.examples.train` -- MLP builder, training loop, accuracy in either BN mode;
* :mod:`bnkernel.examples.demos` -- the experiments, their tables and plots;
* :mod:`bnkernel.examples.cli` -- the ``demo`` command;
* :mod:`bnkernel.examples.train_circles` -- one training loop written out in full
  (``python -m bnkernel.examples.train_circles``);
* :mod:`bnkernel.examples.train_distributed` -- the same model trained over MPI with
  SyncBatchNorm (``mpiexec -n 3 python -m mpi4py -m bnkernel.examples.train_distributed``).
"""
