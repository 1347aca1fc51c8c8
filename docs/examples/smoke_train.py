"""Smoke training run for CI: a small model trained with GradWatch attached.

docs/ci.md runs this file three ways:

    python docs/examples/smoke_train.py --log-dir gradwatch-logs
    gradwatch check gradwatch-logs
    pytest -W error::keras_gradwatch.ExplodingGradientWarning docs/examples/smoke_train.py

The first run exits with status 1 when GradWatch raises on exploding
gradients or non-finite values. The second reads the run record that the
first one wrote. The third runs `test_smoke_training` below, where the
warning filter turns GradWatch's warning into a test failure. In your own
project, replace `build_model` and `make_data` with your model and a small
slice of your data.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradwatch import GradientError, GradWatch  # noqa: E402

DEFAULT_EPOCHS = 3
DEFAULT_LEARNING_RATE = 0.01


def make_data(seed: int = 0, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Return standardised inputs and a noisy linear target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)).astype("float32")
    weights = rng.normal(size=(8, 1)).astype("float32")
    y = (x @ weights + 0.1 * rng.normal(size=(rows, 1))).astype("float32")
    return x, y


def build_model(learning_rate: float, seed: int = 0) -> keras.Model:
    """Build a two-layer ReLU regression model trained with plain SGD."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="smoke",
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def train(
    log_dir: str | os.PathLike | None = None,
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    on_exploding: str = "warn",
    on_nonfinite: str = "warn",
) -> GradWatch:
    """Train the smoke model with GradWatch attached and return the callback."""
    x, y = make_data()
    model = build_model(learning_rate)
    watch = GradWatch(
        log_dir=log_dir, on_exploding=on_exploding, on_nonfinite=on_nonfinite, verbose=0
    )
    model.fit(x, y, batch_size=16, epochs=epochs, callbacks=[watch], verbose=0)
    return watch


def test_smoke_training(tmp_path):
    # With `-W error::keras_gradwatch.ExplodingGradientWarning`, the warning
    # that GradWatch emits on exploding gradients raises inside `fit`.
    train(log_dir=tmp_path / "gradwatch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Train the smoke model with GradWatch; exit 1 on exploding gradients or "
            "non-finite values."
        )
    )
    parser.add_argument("--log-dir", required=True, help="directory for the GradWatch run record")
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default: {DEFAULT_EPOCHS}"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULT_LEARNING_RATE,
        help=f"SGD learning rate (default: {DEFAULT_LEARNING_RATE})",
    )
    args = parser.parse_args(argv)
    try:
        watch = train(
            args.log_dir,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            on_exploding="raise",
            on_nonfinite="raise",
        )
    except GradientError as error:
        print(f"smoke training failed: {error}", file=sys.stderr)
        return 1
    print(
        "smoke training passed: no exploding gradients or non-finite values "
        f"({len(watch.findings)} finding(s) of other kinds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
