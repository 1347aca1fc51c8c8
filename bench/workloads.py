"""Benchmark models, synthetic data and the callback configurations compared.

Models (all trained with Adam on random data from a seeded generator):

- `tiny`: model 1 of the vanishing-gradient tutorial, 18 inputs,
  9 x Dense(10, sigmoid), Dense(1, sigmoid), binary cross-entropy, batch 32.
- `mlp`: 784-2048-1024-512-10 ReLU classifier, 4,235,786 parameters, batch 128.
- `cnn`: two Conv2D + MaxPooling2D blocks, Dense(128), Dense(10) on 32x32x3
  images, batch 64.
- `lstm`: LSTM(64) over sequences of 50 steps and 32 features, Dense(1,
  sigmoid), batch 64.

Configurations:

- `plain`: no callback besides the timer.
- `gradwatch`: `GradWatch(verbose=0)`, everything else at its default.
- `gradwatch_all`: `GradWatch(log_dir, histogram_freq=1, update_freq="batch",
  verbose=0)`: histograms every epoch, statistics read and written every step.
- `tensorboard`: `keras.callbacks.TensorBoard(log_dir, histogram_freq=1)`,
  which writes weight histograms (not gradients) every epoch.
- `naive`: `NaiveGradientNorms`, a second `tf.GradientTape` pass per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from cases import CONFIGS, MODELS


@dataclass(frozen=True)
class Workload:
    """A benchmark model: how to build it and the shape of its data."""

    name: str
    description: str
    batch_size: int
    input_shape: tuple[int, ...]
    # "binary": labels 0/1 of shape (n, 1); an int: class ids in [0, n_classes).
    labels: str | int
    build: Callable[[], keras.Model]
    loss: str


def _build_tiny() -> keras.Model:
    layers = [keras.Input(shape=(18,))]
    for index in range(1, 10):
        layers.append(keras.layers.Dense(10, activation="sigmoid", name=f"dense_{index}"))
    layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
    model = keras.Sequential(layers, name="tiny")
    model.compile(keras.optimizers.Adam(), "binary_crossentropy", metrics=["accuracy"])
    return model


def _build_mlp() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(784,)),
            keras.layers.Dense(2048, activation="relu", name="dense_1"),
            keras.layers.Dense(1024, activation="relu", name="dense_2"),
            keras.layers.Dense(512, activation="relu", name="dense_3"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ],
        name="mlp",
    )
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _build_cnn() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv_1"),
            keras.layers.MaxPooling2D(name="pool_1"),
            keras.layers.Conv2D(64, 3, activation="relu", name="conv_2"),
            keras.layers.MaxPooling2D(name="pool_2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense_1"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ],
        name="cnn",
    )
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _build_lstm() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(50, 32)),
            keras.layers.LSTM(64, name="lstm"),
            keras.layers.Dense(1, activation="sigmoid", name="output"),
        ],
        name="lstm",
    )
    model.compile(keras.optimizers.Adam(), "binary_crossentropy", metrics=["accuracy"])
    return model


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "tiny",
            "18-input MLP, 9 x Dense(10, sigmoid) + Dense(1, sigmoid)",
            32,
            (18,),
            "binary",
            _build_tiny,
            "binary_crossentropy",
        ),
        Workload(
            "mlp",
            "MLP 784-2048-1024-512-10, ReLU",
            128,
            (784,),
            10,
            _build_mlp,
            "sparse_categorical_crossentropy",
        ),
        Workload(
            "cnn",
            "CNN on 32x32x3, 2 x (Conv2D + MaxPool), Dense(128), Dense(10)",
            64,
            (32, 32, 3),
            10,
            _build_cnn,
            "sparse_categorical_crossentropy",
        ),
        Workload(
            "lstm",
            "LSTM(64) over 50 steps x 32 features, Dense(1, sigmoid)",
            64,
            (50, 32),
            "binary",
            _build_lstm,
            "binary_crossentropy",
        ),
    )
}


assert tuple(WORKLOADS) == MODELS, "cases.MODELS and WORKLOADS list different models"


def make_data(workload: Workload, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return `steps` batches of random inputs and labels, in order, as float32/int32."""
    rng = np.random.default_rng(seed)
    n = steps * workload.batch_size
    x = rng.standard_normal((n, *workload.input_shape), dtype=np.float32)
    if workload.labels == "binary":
        y = rng.integers(0, 2, size=(n, 1)).astype(np.float32)
    else:
        y = rng.integers(0, workload.labels, size=(n,)).astype(np.int32)
    return x, y


class NaiveGradientNorms(keras.callbacks.Callback):
    """Per-layer gradient norms from a second `tf.GradientTape` pass on each batch.

    This is the callback users write by hand when Keras gives them no
    gradients: in `on_train_batch_end` it runs the model forward and backward
    again on the batch that just trained. The gradient computation is one
    `tf.function`, traced once, that slices the batch by index out of data
    held as constants, so the only costs beyond the extra pass are the call
    and one host copy of the per-layer norms.

    It needs `fit(x, y, batch_size=..., shuffle=False)` on the same `x` and
    `y`, so batch `i` of every epoch is rows `i * batch_size` onward. Its
    norms are taken after the optimizer has applied the update, at the new
    weights, which is the inaccuracy that recording inside the train step
    avoids.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, loss: str):
        super().__init__()
        self._x = tf.constant(x)
        self._y = tf.constant(y)
        self._batch_size = batch_size
        self._loss_fn = keras.losses.get(loss)
        self._layer_norms = None
        self._batch_norms: list[np.ndarray] = []
        self.epoch_norms: list[np.ndarray] = []

    def on_train_begin(self, logs=None):
        if self._layer_norms is None:
            self._layer_norms = self._make_layer_norms()

    def _make_layer_norms(self):
        model = self.model
        groups = [layer.trainable_weights for layer in model.layers if layer.trainable_weights]
        batch_size = self._batch_size

        @tf.function
        def layer_norms(batch_index):
            start = batch_index * batch_size
            x = self._x[start : start + batch_size]
            y = self._y[start : start + batch_size]
            with tf.GradientTape() as tape:
                predictions = model(x, training=True)
                loss = tf.reduce_mean(self._loss_fn(y, predictions))
            variables = [v for group in groups for v in group]
            gradients = tape.gradient(loss, variables)
            norms = []
            position = 0
            for group in groups:
                layer_gradients = gradients[position : position + len(group)]
                squares = [tf.reduce_sum(tf.square(g)) for g in layer_gradients]
                norms.append(tf.sqrt(tf.add_n(squares)))
                position += len(group)
            return tf.stack(norms)

        return layer_norms

    def on_epoch_begin(self, epoch, logs=None):
        self._batch_norms = []

    def on_train_batch_end(self, batch, logs=None):
        norms = self._layer_norms(tf.constant(batch, tf.int32))
        self._batch_norms.append(norms.numpy())

    def on_epoch_end(self, epoch, logs=None):
        if self._batch_norms:
            self.epoch_norms.append(np.mean(self._batch_norms, axis=0))


def make_callbacks(
    config: str,
    workload: Workload,
    x: np.ndarray,
    y: np.ndarray,
    log_dir: str,
    watch_kwargs: dict | None = None,
) -> list[keras.callbacks.Callback]:
    """Return the callbacks of one configuration; `log_dir` must exist and be empty.

    `watch_kwargs` override `GradWatch` arguments of the `gradwatch` and
    `gradwatch_all` configurations.
    """
    overrides = watch_kwargs or {}
    if config == "plain":
        return []
    if config == "gradwatch":
        from keras_gradwatch import GradWatch

        return [GradWatch(**{"verbose": 0, **overrides})]
    if config == "gradwatch_all":
        from keras_gradwatch import GradWatch

        settings = {"histogram_freq": 1, "update_freq": "batch", "verbose": 0, **overrides}
        return [GradWatch(log_dir=log_dir, **settings)]
    if config == "tensorboard":
        return [keras.callbacks.TensorBoard(log_dir=log_dir, histogram_freq=1)]
    if config == "naive":
        return [NaiveGradientNorms(x, y, workload.batch_size, workload.loss)]
    raise ValueError(f"Invalid configuration {config!r}: expected one of {', '.join(CONFIGS)}")
