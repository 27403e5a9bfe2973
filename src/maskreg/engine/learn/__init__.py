"""Learning-based registration: a network, trained on a cohort's pairs after their linear stages, predicts the
residual deformation of a new pair on a training grid (:mod:`maskreg.learning` holds the settings).

:func:`train` trains one model; :func:`load_model` reads one back; :class:`Model` predicts a pair's field, which
the ``network`` stage (:mod:`maskreg.engine.network_stage`) hands to the deformable stages after it.
"""

from maskreg.engine.learn.cohort import train_model, training_pair
from maskreg.engine.learn.model import Model, load_model, save_model
from maskreg.engine.learn.train import TrainingPair, train

__all__ = ["Model", "TrainingPair", "load_model", "save_model", "train", "train_model", "training_pair"]
