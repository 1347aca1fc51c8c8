"""Gradient monitoring for Keras 3 training on the TensorFlow backend.

`GradWatch` is a Keras callback that records per-layer gradient norms, weight
norms and update sizes from inside the real train step and reports vanishing
and exploding gradients, non-finite values, dead layers and stagnant or
oscillating loss as warnings of their own categories.
"""

import importlib

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
from keras_gradwatch.run_record import RecordError, RunRecord, load_run

__version__ = "0.1.0"

# These names import Keras and TensorFlow, so they are loaded on first use.
# The `gradwatch` command line and `load_run` then start in a fraction of a
# second instead of the seconds that importing TensorFlow takes.
_LAZY_EXPORTS = {
    "GradWatch": "keras_gradwatch.callback",
    "Thresholds": "keras_gradwatch.detectors",
    "record_loss": "keras_gradwatch.instrument",
}


def __getattr__(name):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


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
    "RecordError",
    "RunRecord",
    "Thresholds",
    "VanishingGradientError",
    "VanishingGradientWarning",
    "__version__",
    "load_run",
    "record_loss",
]
