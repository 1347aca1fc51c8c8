"""The four models of the vanishing- and exploding-gradient experiment.

Every model is a `keras.Sequential` binary classifier over the 18 credit-card
features, trained with binary cross-entropy, the accuracy metric and batch
size 32:

1. Vanishing problem: 9 x Dense(10, sigmoid), Dense(1, sigmoid); Adam with
   its defaults; raw inputs.
2. Vanishing fixed: Dense(128), Dense(256), Dense(128), Dense(64), all relu and
   each followed by Dropout(0.5), then Dense(1, sigmoid); Adam(0.001); scaled
   inputs.
3. Exploding problem: 8 x Dense(10, tanh) with RandomNormal(0, 1) kernels,
   Dense(1, sigmoid); SGD(learning_rate=1.0); raw inputs.
4. Exploding fixed: 8 x Dense(10, tanh) with glorot_uniform kernels and a
   max_norm(2.0) constraint, Dense(1, sigmoid); Adam(0.001, clipnorm=1.0);
   scaled inputs.

Models 2 and 4 train with validation data and
`EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)`.
Layers carry fixed names (`dense_1`, `dropout_1`, ..., `output`) so that
findings and figures name the same layers in every run and process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras

N_FEATURES = 18
BATCH_SIZE = 32
LOSS = "binary_crossentropy"
EARLY_STOPPING_PATIENCE = 10


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    return model


def build_model_1() -> keras.Model:
    """Build model 1: nine sigmoid layers of 10 units on raw inputs (vanishing)."""
    layers = [keras.Input(shape=(N_FEATURES,))]
    for index in range(1, 10):
        layers.append(keras.layers.Dense(10, activation="sigmoid", name=f"dense_{index}"))
    layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
    model = keras.Sequential(layers, name="model_1")
    return _compile(model, keras.optimizers.Adam())


def build_model_2() -> keras.Model:
    """Build model 2: ReLU layers with dropout on scaled inputs (vanishing fixed)."""
    layers = [keras.Input(shape=(N_FEATURES,))]
    for index, units in enumerate((128, 256, 128, 64), start=1):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"dense_{index}"))
        layers.append(keras.layers.Dropout(0.5, name=f"dropout_{index}"))
    layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
    model = keras.Sequential(layers, name="model_2")
    return _compile(model, keras.optimizers.Adam(learning_rate=0.001))


def build_model_3() -> keras.Model:
    """Build model 3: eight tanh layers with N(0, 1) weights and SGD(1.0) (exploding)."""
    layers = [keras.Input(shape=(N_FEATURES,))]
    for index in range(1, 9):
        layers.append(
            keras.layers.Dense(
                10,
                activation="tanh",
                kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=1.0),
                name=f"dense_{index}",
            )
        )
    layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
    model = keras.Sequential(layers, name="model_3")
    return _compile(model, keras.optimizers.SGD(learning_rate=1.0))


def build_model_4() -> keras.Model:
    """Build model 4: Glorot init, max-norm and gradient clipping (exploding fixed)."""
    layers = [keras.Input(shape=(N_FEATURES,))]
    for index in range(1, 9):
        layers.append(
            keras.layers.Dense(
                10,
                activation="tanh",
                kernel_initializer="glorot_uniform",
                kernel_constraint=keras.constraints.MaxNorm(2.0),
                name=f"dense_{index}",
            )
        )
    layers.append(keras.layers.Dense(1, activation="sigmoid", name="output"))
    model = keras.Sequential(layers, name="model_4")
    return _compile(model, keras.optimizers.Adam(learning_rate=0.001, clipnorm=1.0))


@dataclass(frozen=True)
class ModelSpec:
    """Recipe of one demo model: its builder, training options and the tutorial's result.

    `problem` is the gradient problem that the tutorial built the model to show
    (`"vanishing"` or `"exploding"`), or `None` for a model that fixes one.
    """

    number: int
    role: str
    build: Callable[[], keras.Model]
    scaled_inputs: bool
    early_stopping: bool
    problem: str | None
    tutorial_result: str

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """Return the model's own callbacks (early stopping for models 2 and 4)."""
        if not self.early_stopping:
            return []
        return [
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=EARLY_STOPPING_PATIENCE,
                restore_best_weights=True,
            )
        ]


MODEL_SPECS: dict[int, ModelSpec] = {
    1: ModelSpec(
        number=1,
        role="vanishing problem",
        build=build_model_1,
        scaled_inputs=False,
        early_stopping=False,
        problem="vanishing",
        tutorial_result="loss ~0.693, accuracy 0.5119 for all 100 epochs",
    ),
    2: ModelSpec(
        number=2,
        role="vanishing fixed",
        build=build_model_2,
        scaled_inputs=True,
        early_stopping=True,
        problem=None,
        tutorial_result="loss ~0.18, accuracy ~0.92; val accuracy 0.93",
    ),
    3: ModelSpec(
        number=3,
        role="exploding problem",
        build=build_model_3,
        scaled_inputs=False,
        early_stopping=False,
        problem="exploding",
        tutorial_result="loss wanders 0.70-0.79, accuracy ~0.50",
    ),
    4: ModelSpec(
        number=4,
        role="exploding fixed",
        build=build_model_4,
        scaled_inputs=True,
        early_stopping=True,
        problem=None,
        tutorial_result="early stop at epoch 70, loss ~0.18; val accuracy 0.86",
    ),
}
