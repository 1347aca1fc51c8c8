"""The `GradWatch` callback: wires instrumentation, detectors and outputs."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import keras
import numpy as np

from keras_gradwatch import detectors as detectors_lib
from keras_gradwatch import findings as F
from keras_gradwatch.instrument import StepInstrument
from keras_gradwatch.records import (
    AGGREGATES,
    LAYER_COLUMNS,
    SCALAR_COLUMNS,
    VARIABLE_COLUMNS,
    EpochAggregator,
    EpochSummary,
    ModelLayout,
    RecentWindow,
    make_step_records,
)

logger = logging.getLogger("keras_gradwatch")

POLICIES = ("warn", "stop", "raise")
REPORT_VERSION = 1


def _check_policy(name: str, value) -> str:
    if value not in POLICIES:
        raise ValueError(
            f"Invalid value for argument `{name}`: expected one of "
            f"{', '.join(repr(p) for p in POLICIES)}. Received: {name}={value!r}"
        )
    return value


def _check_freq(name: str, value, words: tuple[str, ...]):
    if isinstance(value, str):
        if value not in words:
            raise ValueError(
                f"Invalid value for argument `{name}`: expected "
                f"{' or '.join(repr(w) for w in words)} or an integer >= 1. "
                f"Received: {name}={value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"Argument `{name}` must be a string or an int. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    return int(value)


class GradWatch(keras.callbacks.Callback):
    """Watch gradients, weights and updates inside the real training step.

    Add it to `fit` and nothing else changes:

    ```python
    watch = GradWatch()
    model.fit(x, y, epochs=20, callbacks=[watch])
    watch.findings        # what was detected, most severe first
    watch.to_dataframe()  # per-epoch statistics per variable (or level="layer")
    watch.report()        # JSON-serialisable summary
    ```

    On `fit`, the callback rebuilds the model's train function around the
    model's own `train_step`, hooking `model.compute_loss` and
    `optimizer.apply` while the step is traced. The statistics therefore come
    from the very gradients the optimizer applies, with no second forward or
    backward pass, and training is numerically unchanged. After `fit` the
    stock train function is back in place.

    Per trainable variable and step, the graph computes the gradient L2 norm
    and the count of non-finite gradient entries, plus the global gradient
    norm and the batch loss. Every `weight_stats_freq` steps it also computes
    max |g|, the fraction of exactly-zero gradient entries, the weight L2 norm
    after the update and the update norm ||w_after - w_before||. max |g| is
    also computed on any step where a gradient norm is 0 or not finite, and
    on every step when the optimizer clips by value.
    Gradients are unscaled first when a `LossScaleOptimizer` scales the loss.
    These numbers stay in a ring buffer on the device until the host reads
    them (see `update_freq`).

    Detectors (see `keras_gradwatch.detectors`) turn them into findings:
    vanishing gradients (decay with depth, dead layers, tiny updates),
    exploding gradients (spikes, growth towards the input, an absolute
    ceiling, fast weight growth), non-finite values, and stagnant or
    oscillating loss. Each new finding is emitted once as a warning of its own
    category (see `keras_gradwatch.errors`); repeats only update its `count`
    and `last_step`.

    Args:
        log_dir: directory for TensorBoard event files (under `train/`) and
            the run record (`gradwatch.jsonl` and `report.json`). It is
            created at construction if missing. `None` (the default) writes
            nothing to disk.
        histogram_freq: write gradient and weight histograms to TensorBoard
            every this many epochs; 0 (the default) writes none.
        update_freq: how often the host reads the statistics from the device
            and runs the detectors: `"epoch"` (the default), `"batch"`, or an
            integer number of steps. With `"epoch"` the host also reads
            whenever the device buffer is half full, so no step is lost.
        thresholds: a `Thresholds` instance; defaults to `Thresholds()`.
        on_vanishing, on_exploding, on_nonfinite, on_loss: what to do on a new
            finding of that group: `"warn"` (the default) emits the warning;
            `"stop"` also sets `model.stop_training`; `"raise"` also raises a
            `GradientError` subclass carrying the finding. Under `"stop"` or
            `"raise"` for `on_nonfinite`, the train step skips any update whose
            loss or gradients are not finite, and every update after it, so
            the model keeps the last finite weights.
        log_grad_norm: if True, the train step also returns the global
            gradient norm as `grad_norm` in the logs, so it shows in the
            progress bar and `History`. Defaults to `False`.
        verbose: 0 is silent, 1 (the default) logs one status line per epoch
            to the `keras_gradwatch` logger at INFO level, 2 also logs each
            read of the device buffer at DEBUG level. Warnings for findings
            are emitted whatever the verbosity.
        buffer_steps: steps the device ring buffer holds. Defaults to `256`.
            Memory on the device is
            `buffer_steps * (7 * n_variables + 4)` floats.
        weight_stats_freq: compute the weight norm, the update norm, max |g|
            and the fraction of zero gradient entries every this many steps, and at
            the last step of each epoch; `1` computes them every step and `0`
            never. Defaults to `10`. The update norm needs a copy of the
            weights taken before the optimizer writes them, which costs a
            copy of the trainable weights in device memory and a pass over
            every weight on the steps it runs. The gradient norm, max |g|,
            the non-finite check and the loss are computed every step
            whatever this is. On the other steps these columns are NaN.
            With `gradient_accumulation_steps` it is rounded up to a
            multiple of them, so the measured steps are the updating ones.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        histogram_freq: int = 0,
        update_freq: str | int = "epoch",
        thresholds: detectors_lib.Thresholds | None = None,
        on_vanishing: str = "warn",
        on_exploding: str = "warn",
        on_nonfinite: str = "warn",
        on_loss: str = "warn",
        log_grad_norm: bool = False,
        verbose: int = 1,
        buffer_steps: int = 256,
        weight_stats_freq: int = 10,
    ):
        super().__init__()
        self.log_dir = None if log_dir is None else _prepare_log_dir(log_dir)
        if (
            isinstance(histogram_freq, bool)
            or not isinstance(histogram_freq, (int, np.integer))
            or histogram_freq < 0
        ):
            raise ValueError(
                "Invalid value for argument `histogram_freq`: expected an integer >= 0 "
                f"(0 turns histograms off). Received: histogram_freq={histogram_freq!r}"
            )
        self.histogram_freq = int(histogram_freq)
        self.update_freq = _check_freq("update_freq", update_freq, ("epoch", "batch"))
        if isinstance(self.update_freq, int) and self.update_freq < 1:
            raise ValueError(
                f"Invalid value for argument `update_freq`: an integer must be >= 1. "
                f"Received: update_freq={update_freq!r}"
            )
        if thresholds is None:
            thresholds = detectors_lib.Thresholds()
        if not isinstance(thresholds, detectors_lib.Thresholds):
            raise TypeError(
                "Argument `thresholds` must be a keras_gradwatch.Thresholds instance. "
                f"Received: thresholds={thresholds!r} of type {type(thresholds).__name__}"
            )
        self.thresholds = thresholds
        self.policies = {
            "vanishing": _check_policy("on_vanishing", on_vanishing),
            "exploding": _check_policy("on_exploding", on_exploding),
            "nonfinite": _check_policy("on_nonfinite", on_nonfinite),
            "loss": _check_policy("on_loss", on_loss),
        }
        if not isinstance(log_grad_norm, bool):
            raise TypeError(
                "Argument `log_grad_norm` must be a bool. "
                f"Received: log_grad_norm={log_grad_norm!r}"
            )
        self.log_grad_norm = log_grad_norm
        if verbose not in (0, 1, 2):
            raise ValueError(
                f"Invalid value for argument `verbose`: expected 0, 1 or 2. "
                f"Received: verbose={verbose!r}"
            )
        self.verbose = verbose
        if (
            isinstance(buffer_steps, bool)
            or not isinstance(buffer_steps, (int, np.integer))
            or buffer_steps < 2
        ):
            raise ValueError(
                f"Invalid value for argument `buffer_steps`: expected an integer >= 2. "
                f"Received: buffer_steps={buffer_steps!r}"
            )
        self.buffer_steps = int(buffer_steps)
        if (
            isinstance(weight_stats_freq, bool)
            or not isinstance(weight_stats_freq, (int, np.integer))
            or weight_stats_freq < 0
        ):
            raise ValueError(
                "Invalid value for argument `weight_stats_freq`: expected an integer >= 0 "
                "(1 measures every step, 0 never). "
                f"Received: weight_stats_freq={weight_stats_freq!r}"
            )
        self.weight_stats_freq = int(weight_stats_freq)
        self._cached_instrument = None
        self._reset_run_state()

    # -- public results ---------------------------------------------------

    @property
    def findings(self) -> list[F.Finding]:
        """Findings of the last `fit`, most severe first, then by first step."""
        return self._log.sorted()

    @property
    def layout(self) -> ModelLayout | None:
        """Variables and layers of the watched model, in forward order."""
        return self._layout

    @property
    def epochs(self) -> list[EpochSummary]:
        """Per-epoch aggregates of the last `fit`."""
        return list(self._summaries)

    @property
    def recent_steps(self):
        """The most recent step records (a bounded window)."""
        return list(self._window.records)

    def to_dataframe(self, level: str = "variable"):
        """Return the per-epoch statistics as a pandas DataFrame.

        Args:
            level: `"variable"` (the default) gives one row per epoch and
                trainable variable, with columns `epoch`, `layer`, `depth`,
                `variable` (its `variable.path`) and `<stat>_<aggregate>` for
                each statistic in `VARIABLE_COLUMNS` and aggregate in `min`,
                `median`, `max`, `last`. `"layer"` gives one row per epoch and
                layer with `LAYER_COLUMNS`, norms combined over the layer's
                variables as sqrt(sum of squares).
        """
        import pandas as pd

        if level not in ("variable", "layer"):
            raise ValueError(
                f"Invalid value for argument `level`: expected 'variable' or 'layer'. "
                f"Received: level={level!r}"
            )
        rows = []
        layout = self._layout
        for summary in self._summaries:
            if level == "variable":
                for i, info in enumerate(layout.variables):
                    row = {
                        "epoch": summary.epoch,
                        "layer": info.layer,
                        "depth": int(layout.layer_index[i]),
                        "variable": info.path,
                    }
                    for c, column in enumerate(VARIABLE_COLUMNS):
                        for a, aggregate in enumerate(AGGREGATES):
                            row[f"{column}_{aggregate}"] = summary.variables[a, i, c]
                    rows.append(row)
            else:
                for i, layer in enumerate(layout.layers):
                    row = {"epoch": summary.epoch, "layer": layer, "depth": i}
                    for c, column in enumerate(LAYER_COLUMNS):
                        for a, aggregate in enumerate(AGGREGATES):
                            row[f"{column}_{aggregate}"] = summary.layers[a, i, c]
                    rows.append(row)
        return pd.DataFrame(rows)

    def report(self) -> dict:
        """Return a JSON-serialisable summary of the last `fit`.

        Keys: `version`, `steps`, `epochs_completed`, `lost_steps` (steps
        overwritten in the device buffer before the host read them),
        `skipped_updates`, `loss_scale_skips`, `clipping` (the optimizer's
        `clipnorm`, `global_clipnorm` or `clipvalue` setting and the number of
        steps whose raw gradients it clipped, or None), `thresholds`, `policies`,
        `layers` (name, depth, variables with path and shape), `epochs`
        (per-epoch loss mean and per-layer gradient, weight and update-ratio
        aggregates) and `findings` (most severe first, see `Finding.to_dict`).
        """
        layout = self._layout
        layers = []
        if layout is not None:
            for depth, name in enumerate(layout.layers):
                layers.append(
                    {
                        "name": name,
                        "depth": depth,
                        "variables": [
                            {"path": v.path, "shape": list(v.shape)}
                            for v in layout.variables
                            if v.layer == name
                        ],
                    }
                )
        epochs = [self.epoch_report(summary) for summary in self._summaries]
        return {
            "version": REPORT_VERSION,
            "steps": self._next_step,
            "epochs_completed": len(self._summaries),
            "lost_steps": self._lost_steps,
            "skipped_updates": int(sum(s.skipped_updates for s in self._summaries)),
            "loss_scale_skips": self._loss_scale_skips(),
            "clipping": None
            if self._clipping is None
            else {
                "mode": self._clipping[0],
                "value": self._clipping[1],
                "clipped_steps": self._clipped_steps,
            },
            "thresholds": {k: v for k, v in vars(self.thresholds).items()},
            "policies": dict(self.policies),
            "layers": layers,
            "epochs": epochs,
            "findings": [f.to_dict() for f in self.findings],
        }

    def epoch_report(self, summary: EpochSummary) -> dict:
        """Return the entry of `report()["epochs"]` for one epoch's summary."""
        per_layer = {}
        for i, name in enumerate(self._layout.layers):
            per_layer[name] = {
                f"{column}_{aggregate}": F.json_number(summary.layers[a, i, c])
                for c, column in enumerate(LAYER_COLUMNS)
                for a, aggregate in enumerate(AGGREGATES)
            }
        return {
            "epoch": summary.epoch,
            "steps": summary.steps,
            "first_step": summary.first_step,
            "last_step": summary.last_step,
            "loss_mean": F.json_number(summary.loss_mean),
            "global_grad_norm_median": F.json_number(
                summary.scalars[1, SCALAR_COLUMNS.index("global_grad_norm")]
            ),
            "skipped_updates": summary.skipped_updates,
            "layers": per_layer,
        }

    # -- Keras hooks ------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._reset_run_state()
        model = self.model
        _check_model(model)
        self._layout, variables = ModelLayout.from_model(model)
        _build_optimizer(model, variables)
        self._steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        capacity = max(self.buffer_steps, 2 * self._steps_per_execution)
        guard = self.policies["nonfinite"] != "warn"
        self._clipping = _clipping_setting(model.optimizer)
        # Counting the steps that `clipvalue` clips needs max |g| every step.
        max_every_step = self._clipping is not None and self._clipping[0] == "clipvalue"
        store = self.log_dir is not None and self.histogram_freq > 0
        # Reuse the instrumented (already traced) train function when nothing
        # that it captured has changed since the last `fit`, so that repeated
        # `fit` calls do not pay for tracing again.
        key = (
            id(model),
            id(model.optimizer),
            tuple(id(v) for v in variables),
            capacity,
            guard,
            store,
            self.log_grad_norm,
            self.weight_stats_freq,
            max_every_step,
        )
        cached = self._cached_instrument
        if cached is not None and cached[0] == key and cached[1].can_reinstall():
            self._instrument = cached[1]
            self._instrument.reinstall()
        else:
            self._instrument = StepInstrument(
                model,
                variables,
                capacity,
                guard_nonfinite=guard,
                log_grad_norm=self.log_grad_norm,
                measure_every=self.weight_stats_freq,
                max_every_step=max_every_step,
                store_gradients=store,
            )
            self._instrument.install()
            self._cached_instrument = (key, self._instrument)
        loss_scaling = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        self._detectors = []
        for detector_class in detectors_lib.DEFAULT_DETECTORS:
            if detector_class is detectors_lib.NonFiniteDetector:
                detector = detector_class(self.thresholds, self._layout, loss_scaling=loss_scaling)
            else:
                detector = detector_class(self.thresholds, self._layout)
            self._detectors.append(detector)
        self._sinks = self._make_sinks()
        self._call_sinks("open", self)
        if self.verbose:
            logger.info(
                "GradWatch: watching %d trainable variables in %d layers of model %r",
                self._layout.n_variables,
                self._layout.n_layers,
                model.name,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_first_step = self._host_step
        self._aggregator = EpochAggregator(epoch)
        self._store_armed = False
        self._measure_armed = False

    def on_train_batch_begin(self, batch, logs=None):
        instrument = self._instrument
        if instrument is None:
            return
        steps = (self.params or {}).get("steps")
        last = steps is not None and batch + self._steps_per_execution >= steps
        # Measure the weights at the last execution of the epoch, so the
        # epoch's last weight norm is its final one.
        if last and not self._measure_armed and instrument.measure_every > 1:
            instrument.measure_armed.assign(True)
            self._measure_armed = True
        if instrument.gradient_histograms is None or self._store_armed:
            return
        if not self.is_histogram_epoch(self._epoch):
            return
        # Arm the gradient buckets for the last execution of the epoch, so the
        # histograms show the gradients of the epoch's last step. With an
        # unknown epoch length, every step is bucketed and the last one stays.
        if steps is None or last:
            instrument.store_armed.assign(True)
            self._store_armed = True

    def is_histogram_epoch(self, epoch: int) -> bool:
        """Return True if histograms are written at the end of `epoch`."""
        return self.histogram_freq > 0 and epoch % self.histogram_freq == 0

    def gradient_histograms(self):
        """Return the gradient histograms of the last armed step, or None.

        A numpy array of shape `(n_variables, 30, 3)` in the order of
        `layout.variables`: rows `[left edge, right edge, count]` of 30
        equal-width buckets between the gradient's min and max, bucketed on
        the device inside the train step. None when histograms are off.
        Variables without a gradient have rows of 0.
        """
        if self._instrument is None or self._instrument.gradient_histograms is None:
            return None
        return self._instrument.gradient_histograms.numpy()

    @property
    def watched_variables(self) -> list:
        """The model's trainable variables, in the order of `layout.variables`."""
        return [] if self._instrument is None else list(self._instrument.variables)

    def on_train_batch_end(self, batch, logs=None):
        if self._instrument is None:
            return
        # `batch` is the index of the last batch that ran in this epoch; with
        # steps_per_execution > 1 the hook fires once per execution.
        self._host_step = self._epoch_first_step + batch + 1
        pending = self._host_step - self._next_step
        if self.update_freq == "batch":
            due = True
        elif self.update_freq == "epoch":
            due = pending + self._steps_per_execution > self._instrument.capacity // 2
        else:
            due = pending >= self.update_freq
        if due:
            self._read_and_detect()

    def on_epoch_end(self, epoch, logs=None):
        if self._instrument is None:
            return
        self._read_and_detect()
        summary = self._aggregator.summary() if self._aggregator else None
        if summary is None:
            return
        self._summaries.append(summary)
        self._host_step = summary.last_step + 1
        for detector in self._detectors:
            self._handle(detector.on_epoch(summary))
        self._call_sinks("on_epoch", summary, self)
        if self._store_armed:
            self._instrument.store_armed.assign(False)
            self._store_armed = False
        if self._measure_armed:
            self._instrument.measure_armed.assign(False)
            self._measure_armed = False
        self._snapshot_finite_weights()
        if self.verbose:
            column = LAYER_COLUMNS.index("grad_norm")
            norms = summary.layers[1, :, column]
            logger.info(
                "GradWatch epoch %d: %d steps, mean loss %.4g, median layer gradient "
                "norms (input to output) %s, %d finding(s) so far",
                epoch,
                summary.steps,
                summary.loss_mean,
                " ".join(f"{n:.2e}" for n in norms),
                len(self._log),
            )

    def on_train_end(self, logs=None):
        if self._instrument is None:
            return
        try:
            self._read_and_detect()
        finally:
            self._uninstall()
        if self._next_step > 0 and not self._instrument_apply_seen:
            warnings.warn(
                f"GradWatch recorded no gradients for model {self.model.name!r}: its "
                "train step never called `optimizer.apply` or `optimizer.apply_gradients`. "
                "Models whose `train_step` updates the weights another way are not "
                "supported; the findings and statistics are empty.",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- internals --------------------------------------------------------

    def _reset_run_state(self):
        self._log = F.FindingLog()
        self._layout = None
        self._instrument = None
        self._instrument_apply_seen = False
        self._detectors = []
        self._summaries: list[EpochSummary] = []
        self._aggregator = None
        self._window = RecentWindow()
        self._epoch = 0
        self._epoch_first_step = 0
        self._host_step = 0
        self._next_step = 0
        self._lost_steps = 0
        self._finite_weights = None
        self._steps_per_execution = 1
        self._sinks = []
        self._store_armed = False
        self._measure_armed = False
        self._clipping = None
        self._clipped_steps = 0

    def _uninstall(self):
        if self._instrument is not None:
            self._instrument_apply_seen = self._instrument.optimizer_apply_seen
            self._instrument.uninstall()
        self._call_sinks("close", self)
        self._sinks = []

    def _make_sinks(self) -> list:
        """Create the outputs for this run (none without `log_dir`)."""
        if self.log_dir is None:
            return []
        from keras_gradwatch.run_record import RunRecordSink
        from keras_gradwatch.tensorboard_sink import TensorBoardSink

        return [
            RunRecordSink(self.log_dir),
            TensorBoardSink(
                self.log_dir, histogram_freq=self.histogram_freq, update_freq=self.update_freq
            ),
        ]

    def _call_sinks(self, hook: str, *args) -> None:
        """Call `hook` on every sink; a failing sink is logged and dropped."""
        for sink in list(self._sinks):
            try:
                getattr(sink, hook)(*args)
            except Exception:
                logger.exception(
                    "GradWatch: output %r failed in %s and is switched off for this run; "
                    "training continues",
                    sink.name,
                    hook,
                )
                self._sinks.remove(sink)

    def _loss_scale_skips(self) -> int:
        for detector in self._detectors:
            if isinstance(detector, detectors_lib.NonFiniteDetector):
                return detector.loss_scale_skips
        return 0

    def _read_and_detect(self):
        first, variable_rows, scalar_rows, lost = self._instrument.read(self._next_step)
        if lost:
            self._lost_steps += lost
            logger.warning(
                "GradWatch: %d steps were overwritten in the device buffer before they "
                "were read; raise `buffer_steps` or read more often with `update_freq`.",
                lost,
            )
        if self.verbose >= 2:
            logger.debug("GradWatch: read steps %d to %d", first, first + len(scalar_rows) - 1)
        records = make_step_records(
            self._layout,
            first,
            self._epoch,
            variable_rows,
            scalar_rows,
            loss_seen=self._instrument.loss_seen,
        )
        for record in records:
            if self._aggregator is None:
                self._aggregator = EpochAggregator(self._epoch)
            self._aggregator.add(record)
            self._window.append(record)
            if self._clipping is not None and _clipping_acts(self._clipping, record):
                self._clipped_steps += 1
            self._call_sinks("on_step", record)
            # Count the step as read before a policy can raise on it.
            self._next_step = record.step + 1
            for detector in self._detectors:
                self._handle(detector.on_step(record))
        self._next_step = first + len(scalar_rows)

    def _handle(self, new_findings):
        for finding in new_findings:
            if not self._log.add(finding):
                continue
            info = F.KINDS[finding.kind]
            self._call_sinks("on_finding", finding)
            warnings.warn(finding.describe(), info.warning, stacklevel=_caller_stacklevel())
            policy = self.policies[info.group]
            if policy == "warn":
                continue
            self.model.stop_training = True
            if info.group == "nonfinite":
                self._restore_finite_weights()
            if policy == "raise":
                self._uninstall()
                self._instrument = None
                self._cached_instrument = None
                raise info.error(finding)

    def _snapshot_finite_weights(self):
        """Keep a host copy of the weights if they are all finite (guard mode only)."""
        if self.policies["nonfinite"] == "warn":
            return
        weights = [v.numpy() for v in self.model.weights]
        if all(np.all(np.isfinite(w)) for w in weights if w.dtype.kind == "f"):
            self._finite_weights = weights

    def _restore_finite_weights(self):
        """Restore the last finite weights if the current ones are not finite.

        The guarded train step already skips non-finite updates, so the
        weights are normally still finite here. They are not only when an
        update with finite gradients overflowed; then the copy taken at the
        end of the last finite epoch is restored.
        """
        current = [v.numpy() for v in self.model.weights]
        if all(np.all(np.isfinite(w)) for w in current if w.dtype.kind == "f"):
            return
        if self._finite_weights is None:
            logger.error("GradWatch: the weights are not finite and no finite copy exists yet")
            return
        self.model.set_weights(self._finite_weights)
        logger.warning("GradWatch: restored the weights saved at the end of the last finite epoch")


_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (keras, np) if module.__file__
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _caller_stacklevel() -> int:
    """Return the `stacklevel` that points a warning at the user's code.

    Findings are detected deep inside `fit`; the first frame outside Keras,
    TensorFlow and this package is the line that called `fit`.
    """
    import tensorflow as tf

    library_dirs = _LIBRARY_DIRS + (os.path.dirname(tf.__file__) + os.sep,)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(library_dirs):
        frame = frame.f_back
        level += 1
    return level


def _clipping_setting(optimizer) -> tuple[str, float] | None:
    """Return the optimizer's gradient clipping as (mode, value), or None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    for mode in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(optimizer, mode, None)
        if value:
            return mode, float(value)
    return None


def _clipping_acts(clipping: tuple[str, float], record) -> bool:
    """Return True if the optimizer's clipping changes this step's raw gradients.

    The statistics are of the raw gradients, before the optimizer clips them,
    so whether clipping acted follows from them: a variable norm above
    `clipnorm`, the global norm above `global_clipnorm`, or an entry above
    `clipvalue`.
    """
    mode, value = clipping
    if mode == "clipnorm":
        return bool(np.nanmax(record.variable("grad_norm"), initial=0.0) > value)
    if mode == "global_clipnorm":
        return record.global_grad_norm > value
    return bool(np.nanmax(record.variable("grad_max"), initial=0.0) > value)


def _build_optimizer(model, variables) -> None:
    """Create the optimizer's variables now, outside the traced train step.

    Keras otherwise builds the optimizer lazily inside the first traced step,
    which XLA (`jit_compile=True`) cannot compile once the step is
    instrumented. Building it early creates the same variables with the same
    initial values.
    """
    optimizer = model.optimizer
    if optimizer.built:
        return
    with model.distribute_strategy.scope():
        optimizer.build(variables)


def _prepare_log_dir(log_dir) -> str:
    """Create `log_dir` if needed; raise `ValueError` if that is impossible."""
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(
            "Argument `log_dir` must be a path (str or os.PathLike) or None. "
            f"Received: log_dir={log_dir!r} of type {type(log_dir).__name__}"
        )
    path = os.fspath(log_dir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"Invalid value for argument `log_dir`: the directory cannot be created "
            f"({error.strerror}). Received: log_dir={path!r}. Pass a writable directory."
        ) from error
    if not os.access(path, os.W_OK):
        raise ValueError(
            f"Invalid value for argument `log_dir`: the directory is not writable. "
            f"Received: log_dir={path!r}. Pass a writable directory."
        )
    return path


def check_backend(backend: str) -> None:
    """Raise `RuntimeError` unless `backend` is Keras's TensorFlow backend."""
    if backend != "tensorflow":
        raise RuntimeError(
            f"GradWatch needs the TensorFlow backend of Keras; the active backend is "
            f"{backend!r}. Set KERAS_BACKEND=tensorflow before importing keras."
        )


def _check_model(model):
    check_backend(keras.backend.backend())
    if getattr(model, "optimizer", None) is None:
        raise RuntimeError(
            f"Model {model.name!r} has no optimizer. Call `model.compile(optimizer=...)` "
            "before `fit`."
        )
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    if type(model).train_step is not TensorFlowTrainer.train_step:
        warnings.warn(
            f"Model {model.name!r} overrides `train_step`. GradWatch records the "
            "gradients that this step passes to `optimizer.apply` or "
            "`optimizer.apply_gradients`, and the loss returned by `compute_loss` "
            "or passed to `keras_gradwatch.record_loss(loss)` inside the step. "
            "Gradients applied another way are not seen.",
            RuntimeWarning,
            stacklevel=3,
        )
