"""TensorBoard output: per-layer norm scalars, per-variable histograms, findings.

Everything goes to `<log_dir>/train`, the run directory the stock
`keras.callbacks.TensorBoard` uses for training, so both callbacks can share
one `log_dir` and their curves show side by side. Every tag starts with
`gradwatch/`, so none collides with the stock tags (`epoch_loss`,
`batch_loss`, `<weight.path>/histogram`, ...).

Tags (the full table with units is in docs/tensorboard.md):

- `gradwatch/epoch_{grad_norm,weight_norm,update_ratio}/<layer>`: scalars at
  step = epoch. Gradient norm and update ratio are medians over the epoch's
  steps; the weight norm is the value after the epoch's last step.
- `gradwatch/epoch_global_grad_norm`: median global gradient norm per epoch.
- `gradwatch/batch_{grad_norm,weight_norm,update_ratio}/<layer>` and
  `gradwatch/batch_global_grad_norm`: scalars at step = global step, written
  only with `update_freq="batch"` (every step) or an int N (every N steps).
- `gradwatch/gradients/<variable.path>`: histogram at step = epoch, every
  `histogram_freq` epochs, of the gradient of the epoch's last step.
- `gradwatch/weights/<variable.path>`: histogram at step = epoch, every
  `histogram_freq` epochs, of the weights at the end of the epoch.
- `gradwatch/findings`: text, one entry per new finding, at step = the
  global step where the finding was first detected.

A layer's norm combines its variables as sqrt(sum of squares). Histograms use
TensorBoard's own `tf.summary.histogram`, which buckets the tensor on the
device (30 buckets), so only the bucket counts reach the host.
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from keras_gradwatch.records import LAYER_COLUMNS
from keras_gradwatch.sinks import Sink

logger = logging.getLogger("keras_gradwatch")

PREFIX = "gradwatch"
SCALAR_STATS = ("grad_norm", "weight_norm", "update_ratio")


def scalar_tag(scope: str, stat: str, layer: str | None = None) -> str:
    """Return the tag of a scalar: scope is "epoch" or "batch"."""
    if layer is None:
        return f"{PREFIX}/{scope}_{stat}"
    return f"{PREFIX}/{scope}_{stat}/{layer}"


def histogram_tag(kind: str, variable_path: str) -> str:
    """Return the tag of a histogram: kind is "gradients" or "weights"."""
    return f"{PREFIX}/{kind}/{variable_path}"


FINDINGS_TAG = f"{PREFIX}/findings"


class TensorBoardSink(Sink):
    """Writes GradWatch's statistics as TensorBoard summaries.

    Args:
        log_dir: the run's log directory; events go to `log_dir/train`.
        histogram_freq: write histograms every this many epochs (0 = never).
        update_freq: `"epoch"`, `"batch"` or an int; the last two also write
            per-step scalars, every step or every that many steps.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str, histogram_freq: int = 0, update_freq="epoch"):
        self.run_dir = os.path.join(log_dir, "train")
        self.histogram_freq = histogram_freq
        self.update_freq = update_freq
        self._writer = None
        self._layers: list[str] = []

    def _get_writer(self):
        # Created on first use, so a run that writes nothing leaves no file.
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.run_dir)
        return self._writer

    def open(self, watch) -> None:
        self._layers = list(watch.layout.layers)

    def on_step(self, record) -> None:
        if self.update_freq == "epoch":
            return
        if self.update_freq != "batch" and record.step % self.update_freq != 0:
            return
        with self._get_writer().as_default():
            for stat in SCALAR_STATS:
                values = record.layer(stat)
                for layer, value in zip(self._layers, values):
                    tf.summary.scalar(scalar_tag("batch", stat, layer), value, step=record.step)
            tf.summary.scalar(
                scalar_tag("batch", "global_grad_norm"), record.global_grad_norm, step=record.step
            )

    def on_finding(self, finding) -> None:
        with self._get_writer().as_default():
            tf.summary.text(FINDINGS_TAG, finding.describe(), step=finding.step)

    def on_epoch(self, summary, watch) -> None:
        epoch = summary.epoch
        median, last = summary.layers[1], summary.layers[3]
        with self._get_writer().as_default():
            for stat in SCALAR_STATS:
                column = LAYER_COLUMNS.index(stat)
                source = last if stat == "weight_norm" else median
                for layer, value in zip(self._layers, source[:, column]):
                    tf.summary.scalar(scalar_tag("epoch", stat, layer), value, step=epoch)
            tf.summary.scalar(
                scalar_tag("epoch", "global_grad_norm"), summary.scalars[1, 1], step=epoch
            )
            if watch.is_histogram_epoch(epoch):
                self._write_histograms(watch, epoch)
        self._writer.flush()

    def _write_histograms(self, watch, epoch: int) -> None:
        gradients = watch.stored_gradients()
        recent = watch.recent_steps
        has_gradient = recent[-1].has_gradient if recent else None
        for i, (info, variable) in enumerate(zip(watch.layout.variables, watch.watched_variables)):
            tf.summary.histogram(histogram_tag("weights", info.path), variable.value, step=epoch)
            if gradients is not None and has_gradient is not None and has_gradient[i]:
                tf.summary.histogram(
                    histogram_tag("gradients", info.path), gradients[i], step=epoch
                )

    def close(self, watch) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
