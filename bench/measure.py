"""Measure one (model, configuration) in this process and print the result as JSON.

`run.py` starts this script once per measurement, in a fresh process, so the
peak RSS that it reports belongs to that configuration alone. Run it directly
to time one case:

    python bench/measure.py --model mlp --config gradwatch --steps 20 --epochs 4
    python bench/measure.py --model tiny --config gradwatch_all --steps 65 --epochs 4 --profile 30

The run builds the model (seeded), fits one warm-up epoch so that tracing
and the first-call costs are paid, then fits `--epochs` epochs of `--steps`
steps each with the same callbacks. GradWatch rebuilds the train function at
the start of every `fit`, so the first timed epoch traces the step again.
That epoch is timed but left out of the result. The time per step is the wall time from the start
of epoch 2 to the end of the last epoch, every callback's epoch-end work
included, divided by the steps in it. The process CPU time (all threads) over the same epochs
is reported beside it: it is less sensitive to other programs on a shared
machine, but it also counts threads that spin while they wait.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

# The benchmark measures this checkout's keras_gradwatch, installed or not.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH_DIR, os.path.dirname(BENCH_DIR)]
import workloads  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall and process CPU time at each epoch start and at the end of training.

    It must come first in the callback list: its `on_epoch_begin` then runs
    after every callback's `on_epoch_end` for the previous epoch, and its
    `on_train_end` after the last epoch's, so each interval covers one whole
    epoch with all its callback work.
    """

    def __init__(self):
        super().__init__()
        self.marks: list[tuple[float, float]] = []

    def _mark(self):
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_epoch_begin(self, epoch, logs=None):
        self._mark()

    def on_train_end(self, logs=None):
        self._mark()

    def epoch_seconds(self) -> tuple[list[float], list[float]]:
        """Return the wall and the CPU seconds of each epoch."""
        wall = [end[0] - start[0] for start, end in zip(self.marks, self.marks[1:])]
        cpu = [end[1] - start[1] for start, end in zip(self.marks, self.marks[1:])]
        return wall, cpu


def measure(
    model_name: str,
    config: str,
    steps: int,
    epochs: int,
    seed: int,
    profile_lines: int = 0,
    watch_kwargs: dict | None = None,
) -> dict:
    """Fit one warm-up epoch and `epochs` timed epochs, and return times and peak RSS.

    With `profile_lines` > 0 the timed fit runs under cProfile, which slows
    it down, and the functions with the highest cumulative time are printed
    to stderr: that many overall, then that many from keras_gradwatch.
    """
    if epochs < 2:
        raise ValueError(
            f"Invalid --epochs {epochs}: expected at least 2, because the first timed "
            "epoch is not counted"
        )
    workload = workloads.WORKLOADS[model_name]
    keras.utils.set_random_seed(seed)
    x, y = workloads.make_data(workload, steps, seed)
    model = workload.build()

    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as log_dir:
        callbacks = workloads.make_callbacks(config, workload, x, y, log_dir, watch_kwargs)
        fit_args = dict(batch_size=workload.batch_size, shuffle=False, verbose=0)

        start = time.perf_counter()
        model.fit(x, y, epochs=1, callbacks=callbacks, **fit_args)
        warmup_seconds = time.perf_counter() - start

        timer = EpochTimer()
        profiler = cProfile.Profile() if profile_lines else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        model.fit(x, y, epochs=epochs, callbacks=[timer, *callbacks], **fit_args)
        if profiler is not None:
            profiler.disable()
        fit_seconds = time.perf_counter() - start

    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(profile_lines)
        stats.print_stats("keras_gradwatch", profile_lines)

    epoch_seconds, epoch_cpu_seconds = timer.epoch_seconds()
    timed_steps = steps * (epochs - 1)
    # ru_maxrss is in KiB on Linux.
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": model_name,
        "config": config,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "timed_steps": timed_steps,
        "ms_per_step": 1000.0 * sum(epoch_seconds[1:]) / timed_steps,
        "cpu_ms_per_step": 1000.0 * sum(epoch_cpu_seconds[1:]) / timed_steps,
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu_seconds,
        "warmup_seconds": warmup_seconds,
        "fit_seconds": fit_seconds,
        "peak_rss_mib": peak_rss_kib / 1024.0,
        "parameters": int(model.count_params()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--config", required=True, choices=workloads.CONFIGS)
    parser.add_argument("--steps", type=int, required=True, help="steps per epoch")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs of the timed fit; the first is not counted"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra-op and inter-op threads (default: 0, TensorFlow's own choice)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="LINES",
        help="run the timed fit under cProfile and print this many functions to stderr",
    )
    parser.add_argument(
        "--watch-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="GradWatch arguments to override, as a JSON object, e.g. '{\"weight_stats_freq\": 0}'",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    # Findings on random data are expected (the tiny model's sigmoids do
    # vanish); they are emitted as usual but not printed.
    from keras_gradwatch import GradientWarning

    warnings.simplefilter("ignore", GradientWarning)
    result = measure(
        args.model,
        args.config,
        args.steps,
        args.epochs,
        args.seed,
        args.profile,
        watch_kwargs=args.watch_kwargs,
    )
    if args.watch_kwargs:
        result["watch_kwargs"] = args.watch_kwargs
    result["threads"] = args.threads
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
