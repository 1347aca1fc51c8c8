"""Measure the extra time per epoch of histogram writing for the four demo models.

Trains each demo model for 8 epochs with `GradWatch(log_dir=..., histogram_freq=0)`
and with `histogram_freq=1`, three times each, and prints the median epoch
time (epochs 3 to 8) of both. The data directory comes from `GRADWATCH_DATA`.

    GRADWATCH_DATA=/path/to/credit_card python bench/histogram_cost.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from demos import data, models  # noqa: E402
from keras_gradwatch import GradWatch  # noqa: E402

EPOCHS = 8
REPEATS = 3
MODELS = {
    1: (models.build_model_1, False),
    2: (models.build_model_2, True),
    3: (models.build_model_3, False),
    4: (models.build_model_4, True),
}


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, including the epoch-end work of earlier callbacks."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def epoch_times(prepared, number: int, histogram_freq: int) -> list[float]:
    build, scaled = MODELS[number]
    keras.utils.set_random_seed(0)
    model = build()
    x_train, _ = prepared.features(scaled)
    timer = EpochTimer()
    # The timer comes after GradWatch, so GradWatch's histogram writing at the
    # end of each epoch falls inside the timed epoch.
    watch = GradWatch(log_dir=tempfile.mkdtemp(), histogram_freq=histogram_freq, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            x_train,
            prepared.y_train,
            batch_size=32,
            epochs=EPOCHS,
            callbacks=[watch, timer],
            verbose=0,
        )
    return timer.times[2:]  # the first two epochs include tracing


def main() -> None:
    prepared = data.prepare(os.environ.get("GRADWATCH_DATA"), seed=0)
    results: dict[tuple[int, int], list[float]] = {}
    for _ in range(REPEATS):
        for number in MODELS:
            for histogram_freq in (0, 1):
                times = epoch_times(prepared, number, histogram_freq)
                results.setdefault((number, histogram_freq), []).extend(times)
    for number in MODELS:
        without = statistics.median(results[(number, 0)]) * 1000
        with_histograms = statistics.median(results[(number, 1)]) * 1000
        print(
            f"model {number}: epoch {without:.1f} ms without histograms, "
            f"{with_histograms:.1f} ms with, extra {with_histograms - without:.1f} ms "
            f"({with_histograms / without:.2f}x)"
        )


if __name__ == "__main__":
    main()
