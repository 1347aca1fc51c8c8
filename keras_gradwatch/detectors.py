"""Detectors: small units that turn step records into findings.

A detector only decides. It receives `StepRecord`s (one per training step, in
order) and `EpochSummary`s (one per epoch), keeps whatever short history it
needs, and returns `Finding`s. It never reads tensors, writes files or emits
warnings; `GradWatch` does that. Each detector is tested on scripted records.

The thresholds live in `Thresholds`; its docstring gives each default and why.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from keras_gradwatch import findings as F
from keras_gradwatch.records import EpochSummary, ModelLayout, StepRecord

REMEDIES = {
    "depth_decay": (
        "use ReLU-family activations instead of sigmoid/tanh in hidden layers, He or "
        "Glorot initialization, BatchNormalization, or residual connections"
    ),
    "dead_layer": (
        "scale the inputs (e.g. StandardScaler or a Normalization layer) so the "
        "activations do not saturate, use ReLU-family activations, and Glorot/He "
        "initialization"
    ),
    "small_update": (
        "raise the learning rate or use an adaptive optimizer (Adam), and fix any "
        "vanishing gradient upstream (ReLU, BatchNormalization, input scaling)"
    ),
    "spike": (
        "clip gradients (optimizer clipnorm or global_clipnorm), lower the learning "
        "rate, or add a learning-rate warm-up"
    ),
    "depth_growth": (
        "use Glorot/He initialization instead of large random weights, lower the "
        "learning rate, clip gradients (clipnorm), or add BatchNormalization"
    ),
    "ceiling": (
        "scale the inputs, lower the learning rate, and clip gradients (optimizer "
        "clipnorm or global_clipnorm)"
    ),
    "weight_growth": (
        "lower the learning rate, add weight decay or a max-norm kernel constraint, "
        "and clip gradients (clipnorm)"
    ),
    "nonfinite": (
        "lower the learning rate, clip gradients (clipnorm), scale the inputs, check "
        "the data for NaN/Inf, and guard log/division in custom losses"
    ),
    "stagnation": (
        "check for vanishing gradients or dead layers first; otherwise scale the "
        "inputs, change the learning rate, or use a larger model"
    ),
    "oscillation": (
        "lower the learning rate, use an adaptive optimizer (Adam) or a larger batch, "
        "and clip gradients (clipnorm)"
    ),
}


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds, with the reasoning behind each default.

    The defaults are set so that healthy models (for example a scaled-input
    ReLU MLP trained with Adam) produce no finding, while the classic failure
    cases (deep sigmoid stacks on raw inputs, tanh stacks with N(0, 1) weights
    and a large learning rate) do. Change one with
    `GradWatch(thresholds=Thresholds(decay_ratio=1e-4))`.

    Args:
        patience_steps: consecutive steps a per-step condition (depth decay or
            growth) must hold before it is reported. Defaults to `20`, so a
            few noisy batches do not count.
        decay_ratio: report vanishing gradients when the gradient norm of the
            input-side layer divided by that of the output layer is below this.
            Defaults to `1e-3`: in healthy networks the per-layer norms stay
            within one to two orders of magnitude of each other, while a deep
            sigmoid stack loses three or more.
        dead_steps: consecutive steps with an exactly-zero layer gradient
            before the layer is reported as dead. Defaults to `20`. An exact
            zero is never noise: every unit of the layer is saturated or
            inactive on every sample.
        min_update_ratio: report tiny updates when the largest
            ||delta w|| / ||w|| of an epoch, for a layer with a nonzero
            gradient, is below this. Defaults to `1e-7`, far below the 1e-4 to 1e-2 of a layer
            that learns, and near the float32 rounding of the weights.
        spike_factor: report an exploding spike when the global gradient norm
            exceeds this multiple of the median of the last `spike_window`
            steps. Defaults to `25.0`. Minibatch noise moves the norm by a
            factor of 2 to 5, and late in training, when most batches are fit
            and the median is small, by up to 17 (measured on the credit-card
            demo models 2 and 4 over 100 epochs, seeds 0 to 2); a real
            blow-up grows by orders of magnitude.
        spike_window: steps in the running baseline. Defaults to `50`; no
            spike is reported before half of it has been seen.
        growth_ratio: report exploding gradients when the input-side layer's
            gradient norm exceeds the output layer's by this factor for
            `patience_steps` steps. Defaults to `1e3`, as `decay_ratio` the
            other way round, leaving room for wide input layers whose norms
            are naturally larger.
        max_grad_norm: report exploding gradients when the global gradient
            norm exceeds this absolute value. Defaults to `1e4`. A norm that
            large with a mean loss reduction means updates far beyond any
            usable step size, unless the learning rate is tiny.
        weight_growth: report fast weight growth when a layer's weight norm at
            the end of an epoch exceeds this multiple of its value at the
            start of the epoch. Defaults to `10.0`.
        stagnation_window: steps per block over which the loss is averaged
            for the stagnation check. Defaults to `100`.
        stagnation_patience: blocks without improvement before stagnation is
            reported. Defaults to `5` (500 steps by default).
        stagnation_min_delta: relative improvement of the best block mean
            that counts as progress. Defaults to `1e-3`.
        oscillation_window: steps over which batch-to-batch swings are
            measured. Defaults to `50`.
        oscillation_swing: a window oscillates when the mean absolute change
            of the batch loss between consecutive steps, divided by the
            window's mean loss, exceeds this. Defaults to `0.03`: a model
            that learns nothing but is stable moves by well under 1%, while
            an over-large learning rate that throws the output back and forth
            moves it by 5% and more.
        oscillation_progress: ...and when the window's mean loss is less than
            this fraction below the starting level (the lowest mean of the
            first three windows). Defaults to `0.15`.
            Minibatch noise alone gives healthy models swings of 5 to 20%,
            so only a loss that swings without improving is reported.
        oscillation_patience: consecutive oscillating windows before a
            finding. Defaults to `40` (2,000 steps with the default window),
            long enough for a slowly starting healthy model (a dropout MLP,
            say) to improve by more than `oscillation_progress`.
    """

    patience_steps: int = 20
    decay_ratio: float = 1e-3
    dead_steps: int = 20
    min_update_ratio: float = 1e-7
    spike_factor: float = 25.0
    spike_window: int = 50
    growth_ratio: float = 1e3
    max_grad_norm: float = 1e4
    weight_growth: float = 10.0
    stagnation_window: int = 100
    stagnation_patience: int = 5
    stagnation_min_delta: float = 1e-3
    oscillation_window: int = 50
    oscillation_swing: float = 0.03
    oscillation_progress: float = 0.15
    oscillation_patience: int = 40

    def __post_init__(self):
        positive_ints = (
            "patience_steps",
            "dead_steps",
            "spike_window",
            "stagnation_window",
            "stagnation_patience",
            "oscillation_window",
            "oscillation_patience",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"Thresholds.{name} must be an integer >= 1. Received: {name}={value!r}"
                )
        for field_ in dataclasses.fields(self):
            if field_.name in positive_ints:
                continue
            value = getattr(self, field_.name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"Thresholds.{field_.name} must be a finite number > 0. "
                    f"Received: {field_.name}={value!r}"
                )
        if self.decay_ratio >= 1:
            raise ValueError(
                f"Thresholds.decay_ratio must be below 1 (a decay). "
                f"Received: decay_ratio={self.decay_ratio!r}"
            )
        for name in ("spike_factor", "growth_ratio", "weight_growth"):
            if getattr(self, name) <= 1:
                raise ValueError(
                    f"Thresholds.{name} must be above 1 (a growth). "
                    f"Received: {name}={getattr(self, name)!r}"
                )
        for name in ("oscillation_progress", "stagnation_min_delta"):
            if getattr(self, name) >= 1:
                raise ValueError(
                    f"Thresholds.{name} must be a fraction below 1. "
                    f"Received: {name}={getattr(self, name)!r}"
                )


class Detector:
    """Base class: override `on_step` and/or `on_epoch`."""

    name = "detector"

    def __init__(self, thresholds: Thresholds, layout: ModelLayout):
        self.thresholds = thresholds
        self.layout = layout

    def on_step(self, record: StepRecord) -> list[F.Finding]:
        return []

    def on_epoch(self, summary: EpochSummary) -> list[F.Finding]:
        return []

    def finding(
        self,
        kind,
        layers,
        record_or_step,
        epoch,
        value,
        threshold,
        message,
        detected_at=None,
        **extra,
    ):
        step = record_or_step.step if isinstance(record_or_step, StepRecord) else record_or_step
        return F.Finding(
            last_step=step if detected_at is None else int(detected_at),
            kind=kind,
            layers=tuple(layers),
            step=int(step),
            epoch=int(epoch),
            value=float(value),
            threshold=float(threshold),
            message=message,
            remedy=REMEDIES[self.name],
            detector=self.name,
            extra=extra,
        )


def _with_gradient(layer_norms: np.ndarray) -> np.ndarray:
    """Indices of layers with a finite, nonzero gradient norm, forward order."""
    return np.flatnonzero(np.isfinite(layer_norms) & (layer_norms > 0))


class NonFiniteDetector(Detector):
    """NaN/Inf in the loss, gradients or weights, localised in backprop order.

    With loss scaling (`LossScaleOptimizer`), a step with a finite loss whose
    gradients overflowed is skipped by the optimizer and counted in
    `skipped_updates`, not reported: that is dynamic loss scaling at work.
    """

    name = "nonfinite"

    def __init__(self, thresholds, layout, loss_scaling: bool = False):
        super().__init__(thresholds, layout)
        self.loss_scaling = loss_scaling
        self.loss_scale_skips = 0

    def on_step(self, record):
        grad_bad = record.layer("grad_nonfinite") > 0
        weight_bad = ~np.isfinite(record.layer("weight_norm")) & record.weights_measured
        loss_bad = record.loss_seen and not math.isfinite(record.loss)

        if self.loss_scaling and grad_bad.any() and not loss_bad and record.update_skipped:
            self.loss_scale_skips += 1
            return []

        found = []
        if grad_bad.any():
            # Backpropagation runs from the output layer to the input, so the
            # first layer where the gradient went bad is the output-most one.
            layer = self.layout.layers[int(np.flatnonzero(grad_bad)[-1])]
            count = float(record.layer("grad_nonfinite").sum())
            what = "non-finite gradient entries"
            if loss_bad:
                what += f" (batch loss {record.loss})"
            found.append(
                self.finding(
                    F.NONFINITE,
                    [layer],
                    record,
                    record.epoch,
                    count,
                    0.0,
                    f"{int(count)} {what}; backpropagation first produced them in layer {layer!r}",
                )
            )
        elif loss_bad:
            found.append(
                self.finding(
                    F.NONFINITE,
                    [],
                    record,
                    record.epoch,
                    record.loss,
                    0.0,
                    f"the batch loss is {record.loss}",
                )
            )
        if weight_bad.any():
            layers = [self.layout.layers[i] for i in np.flatnonzero(weight_bad)]
            found.append(
                self.finding(
                    F.NONFINITE,
                    layers,
                    record,
                    record.epoch,
                    float(weight_bad.sum()),
                    0.0,
                    "weights are NaN or Inf after the update",
                    source="weights",
                )
            )
        return found


class DeadLayerDetector(Detector):
    """A layer whose gradient is exactly zero for `dead_steps` consecutive steps."""

    name = "dead_layer"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.run_start = [None] * layout.n_layers

    def on_step(self, record):
        found = []
        # max |g|, not the norm: the float32 sum of squares of entries below
        # about 1e-23 underflows to a zero norm although the gradient is not 0.
        largest = record.layer("grad_max")
        for i, value in enumerate(largest):
            if value != 0.0:  # NaN (no gradient) or nonzero ends a run
                self.run_start[i] = None
                continue
            if self.run_start[i] is None:
                self.run_start[i] = (record.step, record.epoch)
            start_step, start_epoch = self.run_start[i]
            length = record.step - start_step + 1
            if length >= self.thresholds.dead_steps:
                layer = self.layout.layers[i]
                found.append(
                    self.finding(
                        F.DEAD_LAYER,
                        [layer],
                        start_step,
                        start_epoch,
                        length,
                        self.thresholds.dead_steps,
                        f"every gradient entry of layer {layer!r} has been exactly zero for "
                        f"{length} consecutive steps, from step {start_step} to step "
                        f"{record.step}, so its weights no longer change: its units are "
                        f"saturated or inactive on every sample",
                        detected_at=record.step,
                    )
                )
        return found


class DepthProfileDetector(Detector):
    """Gradient norms that shrink (vanishing) or grow (exploding) towards the input.

    Compares the input-most and output-most layers that have a nonzero
    gradient; exactly-zero layers are the dead-layer detector's business.
    """

    name = "depth_profile"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.decay_since = None
        self.growth_since = None

    def on_step(self, record):
        norms = record.layer("grad_norm")
        alive = _with_gradient(norms)
        if len(alive) < 2:
            self.decay_since = self.growth_since = None
            return []
        first, last = int(alive[0]), int(alive[-1])
        ratio = norms[first] / norms[last]
        layers = [self.layout.layers[first], self.layout.layers[last]]
        t = self.thresholds
        found = []

        if ratio < t.decay_ratio:
            self.decay_since = self.decay_since or (record.step, record.epoch)
            if record.step - self.decay_since[0] + 1 >= t.patience_steps:
                found.append(
                    self._make(
                        record,
                        F.VANISHING,
                        "depth_decay",
                        layers,
                        ratio,
                        t.decay_ratio,
                        f"the gradient norm falls by a factor of {1 / ratio:.3g} from layer "
                        f"{layers[1]!r} (output side, {norms[last]:.3g}) to layer "
                        f"{layers[0]!r} (input side, {norms[first]:.3g})",
                    )
                )
        else:
            self.decay_since = None

        if ratio > t.growth_ratio:
            self.growth_since = self.growth_since or (record.step, record.epoch)
            if record.step - self.growth_since[0] + 1 >= t.patience_steps:
                found.append(
                    self._make(
                        record,
                        F.EXPLODING,
                        "depth_growth",
                        layers,
                        ratio,
                        t.growth_ratio,
                        f"the gradient norm grows by a factor of {ratio:.3g} from layer "
                        f"{layers[1]!r} (output side, {norms[last]:.3g}) to layer "
                        f"{layers[0]!r} (input side, {norms[first]:.3g})",
                    )
                )
        else:
            self.growth_since = None
        return found

    def _make(self, record, kind, remedy_name, layers, ratio, threshold, message):
        since = self.decay_since if kind == F.VANISHING else self.growth_since
        finding = F.Finding(
            kind=kind,
            layers=tuple(layers),
            step=since[0],
            last_step=record.step,
            epoch=since[1],
            value=float(ratio),
            threshold=float(threshold),
            message=message,
            remedy=REMEDIES[remedy_name],
            detector=remedy_name,
        )
        return finding


class SmallUpdateDetector(Detector):
    """Layers whose relative update size is too small for the weights to move."""

    name = "small_update"

    def on_epoch(self, summary):
        # The epoch maximum, not the median: with gradient accumulation the
        # optimizer updates the weights only every N steps, so most steps
        # have a zero update by design.
        if summary.skipped_updates:
            # A skipped update has size 0 by design; the non-finite detector
            # reports why it was skipped.
            return []
        largest = summary.layers[2]
        ratio = largest[:, _layer_col("update_ratio")]
        grad = largest[:, _layer_col("grad_norm")]
        found = []
        for i, value in enumerate(ratio):
            if not (np.isfinite(value) and grad[i] > 0):
                continue  # dead layers are reported by the dead-layer detector
            if value < self.thresholds.min_update_ratio:
                layer = self.layout.layers[i]
                found.append(
                    self.finding(
                        F.SMALL_UPDATE,
                        [layer],
                        summary.last_step,
                        summary.epoch,
                        value,
                        self.thresholds.min_update_ratio,
                        f"the median update of layer {layer!r} in epoch {summary.epoch} is "
                        f"{value:.3g} of its weight norm, too small for the weights to move",
                    )
                )
        return found


class SpikeDetector(Detector):
    """The global gradient norm jumps far above its recent median."""

    name = "spike"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.history = collections.deque(maxlen=thresholds.spike_window)
        # The same values, sorted, so the median costs no sort per step.
        self._sorted: list[float] = []

    def on_step(self, record):
        norm = record.global_grad_norm
        found = []
        if not math.isfinite(norm):
            return found  # reported by the non-finite detector
        if len(self.history) >= max(2, self.thresholds.spike_window // 2):
            baseline = _sorted_median(self._sorted)
            limit = self.thresholds.spike_factor * baseline
            if baseline > 0 and norm > limit:
                found.append(
                    self.finding(
                        F.EXPLODING,
                        [],
                        record,
                        record.epoch,
                        norm,
                        limit,
                        f"the global gradient norm jumped to {norm:.3g}, "
                        f"{norm / baseline:.3g} times its median of {baseline:.3g} over the "
                        f"last {len(self.history)} steps",
                    )
                )
        if len(self.history) == self.history.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self.history[0])]
        self.history.append(norm)
        bisect.insort(self._sorted, norm)
        return found


def _sorted_median(values: list[float]) -> float:
    """Median of a sorted list, as `np.median` computes it."""
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return (values[middle - 1] + values[middle]) / 2


class CeilingDetector(Detector):
    """The global gradient norm exceeds an absolute ceiling."""

    name = "ceiling"

    def on_step(self, record):
        norm = record.global_grad_norm
        limit = self.thresholds.max_grad_norm
        if not (math.isfinite(norm) and norm > limit):
            return []
        norms = record.layer("grad_norm")
        largest = int(np.nanargmax(np.where(np.isfinite(norms), norms, -np.inf)))
        layer = self.layout.layers[largest]
        return [
            self.finding(
                F.EXPLODING,
                [layer],
                record,
                record.epoch,
                norm,
                limit,
                f"the global gradient norm is {norm:.3g}; the largest layer norm is "
                f"{norms[largest]:.3g} in layer {layer!r}",
            )
        ]


class WeightGrowthDetector(Detector):
    """A layer's weight norm grows by a large factor within one epoch."""

    name = "weight_growth"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.epoch_start = None
        self.epoch = None

    def on_step(self, record):
        if record.epoch != self.epoch and record.weights_measured:
            self.epoch = record.epoch
            self.epoch_start = record.layer("weight_norm").copy()
        return []

    def on_epoch(self, summary):
        if self.epoch_start is None or summary.epoch != self.epoch:
            return []
        end = summary.layers[3][:, _layer_col("weight_norm")]
        found = []
        with np.errstate(divide="ignore", invalid="ignore"):
            growth = end / self.epoch_start
        for i, value in enumerate(growth):
            if (
                np.isfinite(value)
                and self.epoch_start[i] > 0
                and value > self.thresholds.weight_growth
            ):
                layer = self.layout.layers[i]
                found.append(
                    self.finding(
                        F.EXPLODING,
                        [layer],
                        summary.last_step,
                        summary.epoch,
                        value,
                        self.thresholds.weight_growth,
                        f"the weight norm of layer {layer!r} grew {value:.3g} times in epoch "
                        f"{summary.epoch}, from {self.epoch_start[i]:.3g} to {end[i]:.3g}",
                    )
                )
        return found


class LossStagnationDetector(Detector):
    """The batch loss, averaged over blocks of steps, stops improving."""

    name = "stagnation"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.block = []
        self.best = math.inf
        self.blocks_without_progress = 0
        self.since = None

    def on_step(self, record):
        if not math.isfinite(record.loss):
            return []
        self.block.append(record.loss)
        if len(self.block) < self.thresholds.stagnation_window:
            return []
        mean = float(np.mean(self.block))
        self.block = []
        t = self.thresholds
        if mean < self.best * (1.0 - t.stagnation_min_delta) or not math.isfinite(self.best):
            self.best = min(self.best, mean)
            self.blocks_without_progress = 0
            self.since = None
            return []
        self.blocks_without_progress += 1
        if self.since is None:
            self.since = (record.step, record.epoch)
        if self.blocks_without_progress < t.stagnation_patience:
            return []
        steps = self.blocks_without_progress * t.stagnation_window
        improvement = (self.best - mean) / self.best if self.best else 0.0
        return [
            F.Finding(
                kind=F.LOSS_STAGNATION,
                layers=(),
                step=record.step,
                epoch=record.epoch,
                value=improvement,
                threshold=t.stagnation_min_delta,
                message=(
                    f"the mean batch loss has not improved on its best block mean "
                    f"{self.best:.4g} for {steps} steps (now {mean:.4g})"
                ),
                remedy=REMEDIES["stagnation"],
                detector=self.name,
            )
        ]


class LossOscillationDetector(Detector):
    """The batch loss keeps swinging from batch to batch without improving.

    The loss is cut into windows of `oscillation_window` steps. A window
    counts as oscillating when its mean absolute batch-to-batch change,
    relative to its mean, exceeds `oscillation_swing`, and its mean is less
    than `oscillation_progress` below the starting level. The starting level
    is the lowest mean of the first three windows, so that a chaotic first
    window (a badly placed output bias, say) does not count as the start. A
    finding needs `oscillation_patience` such windows in a row, so a healthy
    model that learns slowly at first is not reported.
    """

    reference_windows = 3

    name = "oscillation"

    def __init__(self, thresholds, layout):
        super().__init__(thresholds, layout)
        self.window = []
        self.window_start = None
        self.reference = None
        self.windows_seen = 0
        self.run_start = None
        self.run_length = 0

    def on_step(self, record):
        if not math.isfinite(record.loss):
            return []
        if not self.window:
            self.window_start = (record.step, record.epoch)
        self.window.append(record.loss)
        t = self.thresholds
        if len(self.window) < t.oscillation_window:
            return []
        values = np.asarray(self.window)
        self.window = []
        mean = float(values.mean())
        self.windows_seen += 1
        if self.windows_seen <= self.reference_windows:
            self.reference = mean if self.reference is None else min(self.reference, mean)
        if mean <= 0 or self.reference <= 0:
            return []
        swing = float(np.mean(np.abs(np.diff(values)))) / mean
        progress = (self.reference - mean) / self.reference
        if swing <= t.oscillation_swing or progress >= t.oscillation_progress:
            self.run_start = None
            self.run_length = 0
            return []
        self.run_start = self.run_start or self.window_start
        self.run_length += 1
        if self.run_length < t.oscillation_patience:
            return []
        return [
            F.Finding(
                kind=F.LOSS_OSCILLATION,
                layers=(),
                step=self.run_start[0],
                last_step=record.step,
                epoch=self.run_start[1],
                value=swing,
                threshold=t.oscillation_swing,
                message=(
                    f"the batch loss changes by {swing:.1%} of its mean ({mean:.4g}) from one "
                    f"batch to the next, and after {self.run_length * t.oscillation_window} "
                    f"steps it is only {progress:.1%} below its starting level "
                    f"{self.reference:.4g}"
                ),
                remedy=REMEDIES["oscillation"],
                detector=self.name,
            )
        ]


def _layer_col(name: str) -> int:
    from keras_gradwatch.records import LAYER_COLUMNS

    return LAYER_COLUMNS.index(name)


DEFAULT_DETECTORS = (
    NonFiniteDetector,
    DeadLayerDetector,
    DepthProfileDetector,
    SmallUpdateDetector,
    SpikeDetector,
    CeilingDetector,
    WeightGrowthDetector,
    LossStagnationDetector,
    LossOscillationDetector,
)
