"""TensorBoard output read back with TensorBoard's own reader and server."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_mlp
from scripted import make_layout, make_record
from tensorboard.backend.event_processing import event_accumulator

import keras_gradwatch as kg
from keras_gradwatch import GradWatch
from keras_gradwatch.tensorboard_sink import (
    FINDINGS_TAG,
    TensorBoardSink,
    histogram_tag,
    scalar_tag,
)


def load_run(run_dir):
    accumulator = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def plugin_tags(accumulator, plugin):
    """Tags written for a TensorBoard plugin, empty when the run has none."""
    try:
        return set(accumulator.PluginTagToContent(plugin))
    except KeyError:
        return set()


class WeightSnapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_batch = {}

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch[batch] = self.model.get_weights()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]])).astype("float32")
    return x, y


def expected_tags(layers, paths, histograms, batch_scalars=False):
    scalars = {scalar_tag("epoch", "global_grad_norm")}
    for stat in ("grad_norm", "weight_norm", "update_ratio"):
        scalars |= {scalar_tag("epoch", stat, layer) for layer in layers}
        if batch_scalars:
            scalars |= {scalar_tag("batch", stat, layer) for layer in layers}
    if batch_scalars:
        scalars.add(scalar_tag("batch", "global_grad_norm"))
    hist = set()
    if histograms:
        hist = {histogram_tag(kind, p) for kind in ("gradients", "weights") for p in paths}
    return scalars, hist


def test_exact_tags_and_histograms_match_gradients(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,))
    snapshots = WeightSnapshots()
    watch = GradWatch(log_dir=tmp_path, histogram_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[snapshots, watch], verbose=0)

    run = load_run(str(tmp_path / "train"))
    paths = [v.path for v in watch.layout.variables]
    scalars, histograms = expected_tags(["hidden_0", "out"], paths, histograms=True)
    assert plugin_tags(run, "scalars") == scalars
    assert plugin_tags(run, "histograms") == histograms
    assert plugin_tags(run, "text") == set()  # a healthy run has no finding

    # Independent reference: the gradient of the epoch's last step (rows 48-63)
    # from the weights the model had after the step before it.
    reference = build_mlp(hidden=(8,), seed=5)
    reference.set_weights(snapshots.after_batch[2])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(x[48:], training=True) - y[48:]))
    gradients = tape.gradient(loss, reference.trainable_variables)

    for path, gradient in zip(paths, gradients):
        events = run.Tensors(histogram_tag("gradients", path))
        assert [e.step for e in events] == [0, 1]
        buckets = tf.make_ndarray(events[-1].tensor_proto)
        values = gradient.numpy().ravel()
        assert buckets[:, 2].sum() == values.size
        np.testing.assert_allclose(buckets[0, 0], values.min(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(buckets[-1, 1], values.max(), rtol=1e-5, atol=1e-7)

        # The step's own gradient and the tape's differ in the last bits, which
        # can move an entry lying on a bucket edge to the next bucket.
        assert np.abs(buckets[:, 2] - expected_counts(values)).sum() <= 2

    final = dict(zip(paths, model.get_weights()))
    for path in paths:
        buckets = tf.make_ndarray(run.Tensors(histogram_tag("weights", path))[-1].tensor_proto)
        assert buckets[:, 2].sum() == final[path].size
        np.testing.assert_allclose(buckets[-1, 1], final[path].max(), rtol=1e-6)
        np.testing.assert_array_equal(buckets[:, 2], expected_counts(final[path]))


def expected_counts(values):
    """Bucket counts by numpy: 30 equal-width buckets from min to max, or one."""
    values = np.asarray(values, np.float64).ravel()
    if values.min() == values.max():
        return np.array([values.size])
    return np.histogram(values, bins=30, range=(values.min(), values.max()))[0]


def test_gradient_histograms_under_xla(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,), jit_compile=True)
    watch = GradWatch(log_dir=tmp_path, histogram_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[watch], verbose=0)

    run = load_run(str(tmp_path / "train"))
    for info in watch.layout.variables:
        (event,) = run.Tensors(histogram_tag("gradients", info.path))
        assert tf.make_ndarray(event.tensor_proto)[:, 2].sum() == info.size


def test_epoch_scalars_equal_summaries(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch], verbose=0)

    run = load_run(str(tmp_path / "train"))
    layers = watch.to_dataframe(level="layer")
    for layer in ("hidden_0", "out"):
        events = run.Tensors(scalar_tag("epoch", "grad_norm", layer))
        assert [e.step for e in events] == [0, 1, 2]
        logged = [float(tf.make_ndarray(e.tensor_proto)) for e in events]
        expected = layers[layers.layer == layer].sort_values("epoch").grad_norm_median
        np.testing.assert_allclose(logged, expected, rtol=1e-6)
    assert plugin_tags(run, "histograms") == set()


def test_batch_update_freq_writes_step_scalars(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, update_freq=2, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    run = load_run(str(tmp_path / "train"))
    scalars, _ = expected_tags(["hidden_0", "out"], [], histograms=False, batch_scalars=True)
    assert plugin_tags(run, "scalars") == scalars
    events = run.Tensors(scalar_tag("batch", "global_grad_norm"))
    assert [e.step for e in events] == [0, 2, 4, 6]
    by_step = {r.step: r.global_grad_norm for r in watch.recent_steps}
    for event in events:
        np.testing.assert_allclose(
            float(tf.make_ndarray(event.tensor_proto)), by_step[event.step], rtol=1e-6
        )


def test_findings_written_as_text(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(1e5, 1e6, size=(256, 8)).astype("float32")
    y = (rng.uniform(size=(256, 1)) < 0.5).astype("float32")
    model = build_mlp(
        n_inputs=8,
        hidden=(10,) * 9,
        activation="sigmoid",
        output_activation="sigmoid",
        loss="binary_crossentropy",
    )
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    run = load_run(str(tmp_path / "train"))
    events = run.Tensors(FINDINGS_TAG)
    texts = {tf.make_ndarray(e.tensor_proto).item().decode(): e.step for e in events}
    assert len(texts) == len(watch.findings)
    for finding in watch.findings:
        start = f"{finding.kind} at step {finding.step} (epoch {finding.epoch})"
        (step,) = [s for text, s in texts.items() if text.startswith(start)]
        # Written where it was detected, which is not before the condition started.
        assert step >= finding.step
    steps = [e.step for e in events]
    assert steps == sorted(steps)


def test_findings_written_in_step_order(tmp_path):
    # A finding whose condition started before an earlier-reported one's.
    # TensorBoard drops a tag's events above a step that comes later in the
    # file, so both must be written at steps that do not go back.
    sink = TensorBoardSink(str(tmp_path))
    layout = make_layout()
    stagnation = kg.Finding("loss_stagnation", (), 1499, 23, 0.0, 0.001, "flat", "", "stall")
    oscillation = kg.Finding("loss_oscillation", (), 0, 0, 0.06, 0.03, "swings", "", "swing")
    for step, finding in ((1499, stagnation), (2000, oscillation)):
        sink.on_step(make_record(layout, step, [1.0] * 4))
        sink.on_finding(finding)
    sink.close(None)

    events = load_run(str(tmp_path / "train")).Tensors(FINDINGS_TAG)
    assert [e.step for e in events] == [1499, 2000]
    texts = [tf.make_ndarray(e.tensor_proto).item().decode() for e in events]
    assert texts == [stagnation.describe(), oscillation.describe()]


def test_no_event_file_without_writes(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    model.fit(x, y, batch_size=16, epochs=0, callbacks=[watch], verbose=0)
    assert not (tmp_path / "train").exists()


def test_unwritable_log_dir_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="log_dir") as raised:
        GradWatch(log_dir=blocker / "logs")
    assert str(blocker / "logs") in str(raised.value)


def test_write_failure_does_not_stop_training(tmp_path, data, caplog):
    x, y = data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    # A regular file where the run directory should go makes every write fail.
    (tmp_path / "train").write_text("in the way")
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    assert len(history.history["loss"]) == 2
    assert len(watch.epochs) == 2
    assert any(
        "tensorboard" in r.getMessage() and "switched off" in r.getMessage() for r in caplog.records
    )


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_server_lists_tags(tmp_path, data):
    x, y = data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, histogram_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.monotonic() + 90
        histograms = {}
        while time.monotonic() < deadline:
            try:
                histograms = fetch_json(f"{base}/histograms/tags")
                if histograms.get("train"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        scalars = fetch_json(f"{base}/scalars/tags")
    finally:
        server.terminate()
        server.wait(timeout=30)

    paths = [v.path for v in watch.layout.variables]
    expected_scalars, expected_histograms = expected_tags(["hidden_0", "out"], paths, True)
    assert set(histograms["train"]) == expected_histograms
    assert set(scalars["train"]) == expected_scalars
