"""Scripted step records for detector tests: no model, no TensorFlow."""

import numpy as np

from keras_gradwatch.records import ModelLayout, VariableInfo, make_step_record
from keras_gradwatch.stats import STAT_INDEX, VARIABLE_STATS


def make_layout(n_layers=4):
    """One 10x10 kernel per layer, layers named layer_0 (input side) to layer_{n-1}."""
    return ModelLayout(
        [
            VariableInfo(path=f"model/layer_{i}/kernel", layer=f"layer_{i}", shape=(10, 10))
            for i in range(n_layers)
        ]
    )


def make_record(
    layout,
    step,
    grad_norms,
    loss=0.5,
    epoch=0,
    weight_norms=None,
    update_norms=None,
    nonfinite=None,
    update_skipped=False,
    loss_seen=True,
    weights_measured=True,
):
    """Build a StepRecord from per-layer values (one variable per layer)."""
    n = layout.n_variables
    row = np.zeros((n, len(VARIABLE_STATS)), dtype=np.float32)
    grad_norms = np.asarray(grad_norms, dtype=np.float64)
    row[:, STAT_INDEX["grad_norm"]] = grad_norms
    row[:, STAT_INDEX["grad_max"]] = grad_norms
    row[:, STAT_INDEX["grad_nonfinite"]] = 0 if nonfinite is None else nonfinite
    row[:, STAT_INDEX["grad_zero_fraction"]] = np.where(grad_norms == 0, 1.0, 0.0)
    row[:, STAT_INDEX["weight_norm"]] = 1.0 if weight_norms is None else weight_norms
    row[:, STAT_INDEX["update_norm"]] = 1e-3 if update_norms is None else update_norms
    row[:, STAT_INDEX["has_gradient"]] = np.where(np.isnan(grad_norms), 0.0, 1.0)
    global_norm = float(np.sqrt(np.nansum(grad_norms**2)))
    scalars = np.array([loss, global_norm, float(update_skipped), float(weights_measured)])
    return make_step_record(layout, step, epoch, row, scalars, loss_seen=loss_seen)


def run_steps(detector, records):
    """Feed records to a detector; return all findings in order."""
    found = []
    for record in records:
        found.extend(detector.on_step(record))
    return found
