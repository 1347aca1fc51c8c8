"""Shared fixtures: tiny real Keras models and data, seeded."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, for the MirroredStrategy tests. This must happen
# before TensorFlow initialises its runtime, so it runs at import time.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)


def build_mlp(
    n_inputs=4,
    hidden=(8,),
    activation="relu",
    output_activation=None,
    seed=0,
    optimizer="adam",
    loss="mse",
    **compile_kwargs,
):
    """Build and compile a small Sequential MLP with fixed layer names."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((n_inputs,))]
    for i, units in enumerate(hidden):
        layers.append(keras.layers.Dense(units, activation=activation, name=f"hidden_{i}"))
    layers.append(keras.layers.Dense(1, activation=output_activation, name="out"))
    model = keras.Sequential(layers, name="mlp")
    model.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    return model


@pytest.fixture
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], dtype="float32")).astype("float32")
    return x, y
