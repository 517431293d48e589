"""Force-matching training of fastff's models, one job per module (the public names are
re-exported by :mod:`fastff.train`):

- :mod:`~fastff.training.config`: :class:`TrainConfig`, its checks, the learning-rate schedule.
- :mod:`~fastff.training.data`: frames, the checked data set, batching, the data-set file.
- :mod:`~fastff.training.dynamics` and :mod:`~fastff.training.water`: Langevin MD of water
  labelled by the MM force field, the generated training data.
- :mod:`~fastff.training.model`: the model with its calibrated energy scale and shift.
- :mod:`~fastff.training.loss`: the force-matching loss and one backward step.
- :mod:`~fastff.training.ddp`: process group, per-rank batches, threads per process.
- :mod:`~fastff.training.checkpoint`, :mod:`~fastff.training.files`,
  :mod:`~fastff.training.plots`: what a run writes.
- :mod:`~fastff.training.loop`: :func:`train` and :func:`evaluate`.
- :mod:`~fastff.training.cli`: the ``fastff train`` command line.
"""
