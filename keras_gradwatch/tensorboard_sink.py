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
  Weight norm and update ratio are written at every step where they were
  measured (see `GradWatch(weight_stats_freq=...)`), whatever `update_freq`.
- `gradwatch/gradients/<variable.path>`: histogram at step = epoch, every
  `histogram_freq` epochs, of the gradient of the epoch's last step.
- `gradwatch/weights/<variable.path>`: histogram at step = epoch, every
  `histogram_freq` epochs, of the weights at the end of the epoch.
- `gradwatch/findings`: text, one entry per new finding, at step = the
  global step where the finding was first detected (its text gives the step
  where the condition started).

A layer's norm combines its variables as sqrt(sum of squares).

Events are written with TensorBoard's own `EventFileWriter` from summary
protos built on the host: a step's scalars become one event, which costs
microseconds where one eager `tf.summary.scalar` call per value would cost
a fraction of a millisecond each. Histograms are bucketed on the device (30
equal-width buckets between the tensor's min and max, as
`tf.summary.histogram` does), so only the bucket counts reach the host.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from keras_gradwatch import stats
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


@tf.function
def device_histograms(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
    """Return `stats.histogram` of each tensor, in one call to the device.

    Computed where the tensors live, so a large variable is never copied to
    the host, and in one traced call for all of a model's weights, which
    costs one dispatch instead of one per tensor. It is traced again only
    when the list's shapes change. The tensors are bucketed one after the
    other, so the temporary memory is that of the largest one, not of all
    together.
    """
    results = []
    for tensor in tensors:
        with tf.control_dependencies(results[-1:]):
            results.append(stats.histogram(tensor))
    return results


def histogram_value(tag: str, buckets: np.ndarray) -> summary_pb2.Summary.Value:
    """Return a summary value that TensorBoard's histogram plugin reads."""
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=histogram_metadata.create_summary_metadata(display_name=None, description=None),
        tensor=tensor_util.make_tensor_proto(buckets, dtype=np.float64),
    )


_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None)


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
        self._described: set[str] = set()
        # The latest step the callback has passed on; findings are written
        # there, at the step of detection.
        self._current_step = 0

    def _scalar(self, tag: str, value) -> summary_pb2.Summary.Value:
        """Return a scalar summary value; plugin metadata only on a tag's first one.

        TensorBoard takes a tag's plugin from its first event, as
        `tf.summary.scalar` writes it, so later events leave it out.
        """
        result = summary_pb2.Summary.Value(tag=tag)
        result.tensor.dtype = types_pb2.DT_FLOAT
        result.tensor.float_val.append(float(value))
        if tag not in self._described:
            result.metadata.CopyFrom(_SCALAR_METADATA)
            self._described.add(tag)
        return result

    def _scalars(self, scope: str, stat: str, values) -> list:
        """Return the per-layer scalars of `stat`, leaving out NaN (not measured) ones."""
        return [
            self._scalar(scalar_tag(scope, stat, layer), value)
            for layer, value in zip(self._layers, values)
            if not np.isnan(value)
        ]

    def _write(self, step: int, values: list) -> None:
        if not values:
            return
        # Created on first use, so a run that writes nothing leaves no file.
        if self._writer is None:
            os.makedirs(self.run_dir, exist_ok=True)
            self._writer = EventFileWriter(self.run_dir, max_queue_size=1024, flush_secs=30)
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def open(self, watch) -> None:
        self._layers = list(watch.layout.layers)

    def on_step(self, record) -> None:
        self._current_step = record.step
        if self.update_freq == "epoch":
            return
        values = []
        # Weight norm and update ratio at every step that measured them,
        # gradient norms every `update_freq` steps.
        if record.weights_measured:
            for stat in ("weight_norm", "update_ratio"):
                values.extend(self._scalars("batch", stat, record.layer(stat)))
        if self.update_freq == "batch" or record.step % self.update_freq == 0:
            values.extend(self._scalars("batch", "grad_norm", record.layer("grad_norm")))
            global_norm = record.global_grad_norm
            values.append(self._scalar(scalar_tag("batch", "global_grad_norm"), global_norm))
        self._write(record.step, values)

    def on_finding(self, finding) -> None:
        # At the step of detection, not `finding.step` where the condition
        # started: TensorBoard drops the events of a tag above a step that
        # comes later in the file, as it does after a restart from a
        # checkpoint, so the steps of a tag must not go back.
        step = max(finding.step, self._current_step)
        self._write(step, list(text_pb(FINDINGS_TAG, finding.describe()).value))

    def on_epoch(self, summary, watch) -> None:
        epoch = summary.epoch
        median, last = summary.layers[1], summary.layers[3]
        values = []
        for stat in SCALAR_STATS:
            source = last if stat == "weight_norm" else median
            values.extend(self._scalars("epoch", stat, source[:, LAYER_COLUMNS.index(stat)]))
        values.append(self._scalar(scalar_tag("epoch", "global_grad_norm"), summary.scalars[1, 1]))
        if watch.is_histogram_epoch(epoch):
            values.extend(self._histograms(watch))
        self._write(epoch, values)
        self._writer.flush()

    def _histograms(self, watch) -> list:
        gradients = watch.gradient_histograms()
        recent = watch.recent_steps
        has_gradient = recent[-1].has_gradient if recent else None
        infos = watch.layout.variables
        # A tensor read of the variable, not the variable itself: passing
        # variables to a traced function returned another variable's buckets
        # on TF 2.21.
        weights = [tf.convert_to_tensor(v.value) for v in watch.watched_variables]
        values = [
            histogram_value(histogram_tag("weights", info.path), stats.trim_histogram(b.numpy()))
            for info, b in zip(infos, device_histograms(weights))
        ]
        if gradients is not None and has_gradient is not None:
            for i, info in enumerate(infos):
                if has_gradient[i]:
                    rows = stats.trim_histogram(gradients[i])
                    values.append(histogram_value(histogram_tag("gradients", info.path), rows))
        return values

    def close(self, watch) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
