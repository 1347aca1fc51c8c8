"""Host-side records: the model layout, one step's statistics, epoch aggregates."""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field

import numpy as np

from keras_gradwatch.stats import SCALAR_INDEX, STAT_INDEX

# Per-variable columns kept on the host: the device statistics less the
# `has_gradient` flag, plus the relative update size.
VARIABLE_COLUMNS = (
    "grad_norm",
    "grad_max",
    "grad_nonfinite",
    "grad_zero_fraction",
    "weight_norm",
    "update_norm",
    "update_ratio",
)
# Per-layer columns: norms combine the layer's variables as sqrt(sum of squares).
LAYER_COLUMNS = (
    "grad_norm",
    "grad_max",
    "grad_nonfinite",
    "weight_norm",
    "update_norm",
    "update_ratio",
)
SCALAR_COLUMNS = ("loss", "global_grad_norm", "update_skipped")
# Columns computed on measured steps only (see `GradWatch(weight_stats_freq=...)`);
# NaN on the other steps.
# `grad_max` is also computed on other steps where a norm is 0 or not finite.
MEASURED_VARIABLE_COLUMNS = (
    "grad_max",
    "grad_zero_fraction",
    "weight_norm",
    "update_norm",
    "update_ratio",
)
MEASURED_LAYER_COLUMNS = ("grad_max", "weight_norm", "update_norm", "update_ratio")
AGGREGATES = ("min", "median", "max", "last")


@dataclass(frozen=True)
class VariableInfo:
    """A trainable variable: its `variable.path`, owning layer and shape."""

    path: str
    layer: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class ModelLayout:
    """Trainable variables of a model grouped by layer, layers in forward order.

    The owning layer of a variable is the innermost layer that tracks it, so
    the variables of a nested model or a layer made of layers are grouped
    under the layer that holds them. A layer used twice appears once.
    """

    def __init__(self, variables: list[VariableInfo]):
        self.variables = list(variables)
        self.layers: list[str] = []
        for info in self.variables:
            if info.layer not in self.layers:
                self.layers.append(info.layer)
        position = {name: i for i, name in enumerate(self.layers)}
        self.layer_index = np.array([position[v.layer] for v in self.variables], dtype=np.int64)
        # When every layer's variables are contiguous (the usual case), the
        # index where each layer starts makes a per-layer reduction one
        # `reduceat`. Otherwise each layer's column indices are used.
        self._starts = None
        if np.all(np.diff(self.layer_index) >= 0):
            self._starts = np.flatnonzero(np.diff(self.layer_index, prepend=-1) != 0)
        self._columns = [np.flatnonzero(self.layer_index == i) for i in range(len(self.layers))]

    @classmethod
    def from_model(cls, model) -> tuple[ModelLayout, list]:
        """Return the layout and the trainable variables, both in forward order."""
        owner: dict[int, str] = {}
        order: dict[int, int] = {}
        layers = list(model._flatten_layers(include_self=False, recursive=True))
        for depth, layer in enumerate(layers):
            for variable in layer.trainable_weights:
                owner[id(variable)] = layer.name
                order.setdefault(id(variable), depth)
        variables = list(model.trainable_variables)
        # Sort by the first layer (pre-order) that tracks the variable, which is
        # forward order for Sequential and Functional models; ties keep the
        # model's own order.
        ranked = sorted(
            enumerate(variables), key=lambda item: (order.get(id(item[1]), len(layers)), item[0])
        )
        variables = [v for _, v in ranked]
        infos = [
            VariableInfo(
                path=v.path,
                layer=owner.get(id(v), model.name),
                shape=tuple(int(d) for d in v.shape),
            )
            for v in variables
        ]
        return cls(infos), variables

    @property
    def n_variables(self) -> int:
        return len(self.variables)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def combine_norms(self, per_variable: np.ndarray) -> np.ndarray:
        """Combine per-variable L2 norms into per-layer L2 norms (last axis).

        NaN entries (no gradient) are left out; a layer with no finite-or-inf
        entry at all gets NaN.
        """
        squares = np.square(per_variable.astype(np.float64))
        present = ~np.isnan(squares)
        sums = self._reduce(np.add, np.where(present, squares, 0.0))
        counts = self._reduce(np.add, present.astype(np.float64))
        with np.errstate(invalid="ignore"):
            return np.where(counts > 0, np.sqrt(sums), np.nan)

    def combine_max(self, per_variable: np.ndarray) -> np.ndarray:
        """Per-layer maximum (last axis), NaN entries left out; NaN for a layer with none."""
        return self._reduce(np.fmax, per_variable.astype(np.float64))

    def combine_sum(self, per_variable: np.ndarray) -> np.ndarray:
        """Per-layer sum (last axis), NaN entries counted as 0."""
        return self._reduce(np.add, np.nan_to_num(per_variable.astype(np.float64), nan=0.0))

    def _reduce(self, ufunc, values: np.ndarray) -> np.ndarray:
        """Reduce the last axis (variables) per layer with `ufunc`."""
        if self._starts is not None:
            return ufunc.reduceat(values, self._starts, axis=-1)
        return np.stack([ufunc.reduce(values[..., c], axis=-1) for c in self._columns], axis=-1)


@dataclass
class StepRecord:
    """Statistics of one training step, as read back from the device."""

    step: int
    epoch: int
    variables: np.ndarray  # (n_variables, len(VARIABLE_COLUMNS))
    layers: np.ndarray  # (n_layers, len(LAYER_COLUMNS))
    has_gradient: np.ndarray  # (n_variables,) bool
    loss: float
    global_grad_norm: float
    update_skipped: bool
    loss_seen: bool = True
    # False when the step did not compute the columns in
    # MEASURED_VARIABLE_COLUMNS and MEASURED_LAYER_COLUMNS; they are NaN then.
    weights_measured: bool = True

    def variable(self, column: str) -> np.ndarray:
        return self.variables[:, VARIABLE_COLUMNS.index(column)]

    def layer(self, column: str) -> np.ndarray:
        return self.layers[:, LAYER_COLUMNS.index(column)]

    def scalars(self) -> np.ndarray:
        return np.array([self.loss, self.global_grad_norm, float(self.update_skipped)])


def make_step_record(
    layout: ModelLayout,
    step: int,
    epoch: int,
    device_row: np.ndarray,
    scalar_row: np.ndarray,
    loss_seen: bool = True,
) -> StepRecord:
    """Build a `StepRecord` from one row of the device buffers."""
    (record,) = make_step_records(
        layout, step, epoch, np.asarray(device_row)[None], np.asarray(scalar_row)[None], loss_seen
    )
    return record


def make_step_records(
    layout: ModelLayout,
    first_step: int,
    epoch: int,
    device_rows: np.ndarray,
    scalar_rows: np.ndarray,
    loss_seen: bool = True,
) -> list[StepRecord]:
    """Build the `StepRecord`s of consecutive steps from rows of the device buffer.

    `device_rows` has shape `(steps, n_variables, len(VARIABLE_STATS))` and
    `scalar_rows` `(steps, len(STEP_SCALARS))`. The per-layer columns of all
    steps are computed together.
    """
    rows = np.asarray(device_rows, dtype=np.float64)
    scalars = np.asarray(scalar_rows, dtype=np.float64)
    weight_norm = rows[:, :, STAT_INDEX["weight_norm"]]
    update_norm = rows[:, :, STAT_INDEX["update_norm"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        update_ratio = np.where(weight_norm > 0, update_norm / weight_norm, np.nan)
    variables = np.concatenate(
        [rows[:, :, [STAT_INDEX[name] for name in VARIABLE_COLUMNS[:-1]]], update_ratio[..., None]],
        axis=2,
    )
    layer_weight = layout.combine_norms(weight_norm)
    layer_update = layout.combine_norms(update_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        layer_ratio = np.where(layer_weight > 0, layer_update / layer_weight, np.nan)
    layers = np.stack(
        [
            layout.combine_norms(rows[:, :, STAT_INDEX["grad_norm"]]),
            layout.combine_max(rows[:, :, STAT_INDEX["grad_max"]]),
            layout.combine_sum(rows[:, :, STAT_INDEX["grad_nonfinite"]]),
            layer_weight,
            layer_update,
            layer_ratio,
        ],
        axis=2,
    )
    has_gradient = rows[:, :, STAT_INDEX["has_gradient"]] > 0.5
    loss = scalars[:, SCALAR_INDEX["loss"]].tolist()
    global_norm = scalars[:, SCALAR_INDEX["global_grad_norm"]].tolist()
    skipped = (scalars[:, SCALAR_INDEX["update_skipped"]] > 0.5).tolist()
    measured = (scalars[:, SCALAR_INDEX["weights_measured"]] > 0.5).tolist()
    return [
        StepRecord(
            step=first_step + i,
            epoch=epoch,
            variables=variables[i],
            layers=layers[i],
            has_gradient=has_gradient[i],
            loss=loss[i],
            global_grad_norm=global_norm[i],
            update_skipped=skipped[i],
            loss_seen=loss_seen,
            weights_measured=measured[i],
        )
        for i in range(len(rows))
    ]


@dataclass
class EpochSummary:
    """Min, median, max and last of every statistic over one epoch.

    Each array has a leading axis of `AGGREGATES` (min, median, max, last).
    The median is exact up to `EpochAggregator.reservoir_size` steps per epoch
    and taken from a uniform random sample of the epoch's steps beyond that.
    """

    epoch: int
    steps: int
    first_step: int
    last_step: int
    variables: np.ndarray  # (4, n_variables, len(VARIABLE_COLUMNS))
    layers: np.ndarray  # (4, n_layers, len(LAYER_COLUMNS))
    scalars: np.ndarray  # (4, len(SCALAR_COLUMNS))
    loss_mean: float
    skipped_updates: int


class EpochAggregator:
    """Running min/median/max/last of a step's statistics, in bounded memory."""

    def __init__(self, epoch: int, reservoir_size: int = 256, seed: int = 0):
        self.epoch = epoch
        self.reservoir_size = reservoir_size
        self._rng = np.random.default_rng(seed + epoch)
        self._min = None
        self._max = None
        self._last = None
        self._reservoir: list[np.ndarray] = []
        self.steps = 0
        self.first_step = -1
        self.last_step = -1
        self._loss_sum = 0.0
        self._loss_count = 0
        self._skipped = 0
        self._shapes = None

    def add(self, record: StepRecord) -> None:
        flat = np.concatenate([record.variables.ravel(), record.layers.ravel(), record.scalars()])
        if self._shapes is None:
            self._shapes = (record.variables.shape, record.layers.shape)
            self._measured_mask = _measured_mask(record.variables.shape, record.layers.shape)
            self._min = flat.copy()
            self._max = flat.copy()
            self._last = flat
            self.first_step = record.step
        else:
            self._min = np.fmin(self._min, flat)
            self._max = np.fmax(self._max, flat)
            if record.weights_measured:
                self._last = flat
            else:
                # "last" of a measured column is its last measured value.
                self._last = np.where(self._measured_mask, self._last, flat)
        self.last_step = record.step
        self.steps += 1
        if np.isfinite(record.loss):
            self._loss_sum += record.loss
            self._loss_count += 1
        self._skipped += int(record.update_skipped)

        # Reservoir sampling keeps a uniform sample of the epoch's steps.
        if len(self._reservoir) < self.reservoir_size:
            self._reservoir.append(flat)
        else:
            slot = self._rng.integers(0, self.steps)
            if slot < self.reservoir_size:
                self._reservoir[slot] = flat

    def summary(self) -> EpochSummary | None:
        if self._shapes is None:
            return None
        with warnings.catch_warnings():
            # All-NaN columns (variables without a gradient) give NaN medians.
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(np.stack(self._reservoir), axis=0)
        stacked = np.stack([self._min, median, self._max, self._last])
        var_shape, layer_shape = self._shapes
        n_var = int(np.prod(var_shape))
        n_layer = int(np.prod(layer_shape))
        return EpochSummary(
            epoch=self.epoch,
            steps=self.steps,
            first_step=self.first_step,
            last_step=self.last_step,
            variables=stacked[:, :n_var].reshape((4,) + var_shape),
            layers=stacked[:, n_var : n_var + n_layer].reshape((4,) + layer_shape),
            scalars=stacked[:, n_var + n_layer :],
            loss_mean=self._loss_sum / self._loss_count if self._loss_count else float("nan"),
            skipped_updates=self._skipped,
        )


def _measured_mask(variable_shape, layer_shape) -> np.ndarray:
    """Return a mask of the measured-step columns in `EpochAggregator`'s flat layout."""
    variables = np.zeros(variable_shape, bool)
    variables[:, [VARIABLE_COLUMNS.index(c) for c in MEASURED_VARIABLE_COLUMNS]] = True
    layers = np.zeros(layer_shape, bool)
    layers[:, [LAYER_COLUMNS.index(c) for c in MEASURED_LAYER_COLUMNS]] = True
    return np.concatenate([variables.ravel(), layers.ravel(), np.zeros(len(SCALAR_COLUMNS), bool)])


@dataclass
class RecentWindow:
    """The last `size` step records, for detectors and the report."""

    size: int = 64
    records: collections.deque = field(default_factory=collections.deque)

    def append(self, record: StepRecord) -> None:
        self.records.append(record)
        while len(self.records) > self.size:
            self.records.popleft()
