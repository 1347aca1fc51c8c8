"""Gradient monitoring for Keras 3 training on the TensorFlow backend.

`GradWatch` is a Keras callback that records per-layer gradient norms, weight
norms and update sizes from inside the real train step and reports vanishing
and exploding gradients, non-finite values, dead layers and stagnant or
oscillating loss as warnings of their own categories.
"""

from keras_gradwatch.callback import GradWatch
from keras_gradwatch.detectors import Thresholds
from keras_gradwatch.errors import (
    DeadLayerWarning,
    ExplodingGradientError,
    ExplodingGradientWarning,
    GradientError,
    GradientWarning,
    LossBehaviourError,
    LossOscillationWarning,
    LossStagnationWarning,
    NonFiniteError,
    NonFiniteWarning,
    VanishingGradientError,
    VanishingGradientWarning,
)
from keras_gradwatch.findings import Finding
from keras_gradwatch.instrument import record_loss

__version__ = "0.1.0"

__all__ = [
    "DeadLayerWarning",
    "ExplodingGradientError",
    "ExplodingGradientWarning",
    "Finding",
    "GradWatch",
    "GradientError",
    "GradientWarning",
    "LossBehaviourError",
    "LossOscillationWarning",
    "LossStagnationWarning",
    "NonFiniteError",
    "NonFiniteWarning",
    "Thresholds",
    "VanishingGradientError",
    "VanishingGradientWarning",
    "__version__",
    "record_loss",
]
