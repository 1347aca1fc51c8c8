"""Check that GradWatch's memory stays flat over a long run.

Trains a tiny Dense model (16 inputs, Dense(8, relu), Dense(1)) for
`--epochs` epochs of `--steps` steps (100 x 1,000 = 100,000 steps by
default) with `GradWatch()` at its defaults, or with no callback at all
under `--config plain`, and samples the process's resident set size (RSS,
from /proc/self/statm) at the end of every epoch. It prints the RSS at
epochs 1, 10, 50 and 100 and the least-squares slope of RSS over the epochs
from `--settle` on, so tracing and the allocator's first growth are left out.

    python bench/memory_long_run.py                  # GradWatch, about 5 minutes
    python bench/memory_long_run.py --config plain   # the same run without it
    python bench/memory_long_run.py --epochs 5 --steps 200 --output rss.json
    python bench/memory_long_run.py --epochs 60 --steps 200 --trace-python

GradWatch keeps one summary per epoch by design, and the script prints its
pickled size, so a slope of that order is expected. State that grew with the
number of steps would show as a slope of hundreds of KiB per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import time
import tracemalloc
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

# The benchmark measures this checkout's keras_gradwatch, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_gradwatch import GradientWarning, GradWatch  # noqa: E402

BATCH_SIZE = 32
REPORTED_EPOCHS = (1, 10, 50, 100)


def current_rss_mib() -> float:
    """Return the resident set size of this process now, in MiB."""
    with open("/proc/self/statm") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024**2


class RssSampler(keras.callbacks.Callback):
    """Samples RSS and wall time at the end of every epoch.

    With `trace_epochs` (1-based) it also takes a tracemalloc snapshot at the
    end of each of those epochs; tracemalloc must be running.
    """

    def __init__(self, trace_epochs: tuple[int, ...] = ()):
        super().__init__()
        self.rss_mib: list[float] = []
        self.seconds: list[float] = []
        self.snapshots: dict[int, tracemalloc.Snapshot] = {}
        self._trace_epochs = trace_epochs
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.rss_mib.append(current_rss_mib())
        self.seconds.append(time.perf_counter() - self._start)
        if epoch + 1 in self._trace_epochs:
            self.snapshots[epoch + 1] = tracemalloc.take_snapshot()


def python_heap_growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot) -> dict:
    """Return the growth of Python allocations between two snapshots, in bytes.

    `total` leaves out tracemalloc's own allocations (the first snapshot is
    still alive), and `keras_gradwatch` sums the files of that package.
    """
    growth = {"total": 0, "keras_gradwatch": 0}
    for difference in last.compare_to(first, "filename"):
        filename = difference.traceback[0].filename
        if filename == tracemalloc.__file__:
            continue
        growth["total"] += difference.size_diff
        if f"{os.sep}keras_gradwatch{os.sep}" in filename:
            growth["keras_gradwatch"] += difference.size_diff
    return growth


def slope_kib_per_epoch(rss_mib: list[float], first_epoch: int) -> float:
    """Return the least-squares slope of RSS from `first_epoch` (1-based) on, in KiB/epoch."""
    values = np.asarray(rss_mib[first_epoch - 1 :]) * 1024
    if len(values) < 2:
        return float("nan")
    epochs = np.arange(first_epoch, first_epoch + len(values))
    return float(np.polyfit(epochs, values, 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("gradwatch", "plain"), default="gradwatch")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default: 100)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per epoch (default: 1000)")
    parser.add_argument(
        "--settle",
        type=int,
        default=10,
        help="first epoch (1-based) of the slope fit (default: 10)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--output", default=None, help="write the samples to this JSON file")
    parser.add_argument(
        "--trace-python",
        action="store_true",
        help="also compare Python allocations (tracemalloc) from --settle to the last epoch; "
        "slows training down",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.steps < 1:
        parser.error(
            f"invalid --epochs {args.epochs} or --steps {args.steps}: both must be at least 1"
        )
    settle = min(args.settle, args.epochs)

    warnings.simplefilter("ignore", GradientWarning)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.steps * BATCH_SIZE, 16), dtype=np.float32)
    y = (x[:, :1] + 0.1 * rng.standard_normal((len(x), 1), dtype=np.float32)).astype(np.float32)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(), "mse")

    trace_epochs = (settle, args.epochs) if args.trace_python and settle < args.epochs else ()
    if trace_epochs:
        tracemalloc.start(1)
    sampler = RssSampler(trace_epochs)
    callbacks = [sampler]
    watch = None
    if args.config == "gradwatch":
        watch = GradWatch()
        callbacks.insert(0, watch)
    rss_start = current_rss_mib()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=args.epochs, verbose=0, callbacks=callbacks)

    rss = sampler.rss_mib
    result = {
        "config": args.config,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "total_steps": args.epochs * args.steps,
        "seconds": sampler.seconds[-1],
        "rss_before_fit_mib": rss_start,
        "rss_mib_by_epoch": rss,
        "rss_mib_at": {str(e): rss[e - 1] for e in REPORTED_EPOCHS if e <= len(rss)},
        "slope_from_epoch": settle,
        "slope_kib_per_epoch": slope_kib_per_epoch(rss, settle),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_1min_at_end": os.getloadavg()[0],
    }
    if watch is not None:
        result["gradwatch_epoch_summaries"] = len(watch.epochs)
        result["gradwatch_recent_steps"] = len(watch.recent_steps)
        result["gradwatch_lost_steps"] = watch.report()["lost_steps"]
        # The pickled size estimates the memory that one epoch summary uses.
        result["gradwatch_summary_bytes"] = len(pickle.dumps(watch.epochs[-1]))
    if trace_epochs:
        growth = python_heap_growth(sampler.snapshots[settle], sampler.snapshots[args.epochs])
        epochs_between = args.epochs - settle
        result["python_heap_growth_bytes"] = growth
        result["python_heap_growth_kib_per_epoch"] = {
            key: value / 1024 / epochs_between for key, value in growth.items()
        }

    print(
        f"{args.config}: {result['total_steps']} steps in {result['seconds']:.0f} s, "
        f"RSS before fit {rss_start:.1f} MiB"
    )
    for epoch, value in result["rss_mib_at"].items():
        print(f"  RSS after epoch {epoch:>3}: {value:.1f} MiB")
    print(
        f"  slope from epoch {settle}: {result['slope_kib_per_epoch']:.1f} KiB/epoch "
        f"({result['slope_kib_per_epoch'] * 1000 / args.steps:.1f} KiB per 1,000 steps)"
    )
    if watch is not None:
        print(
            f"  GradWatch holds {result['gradwatch_epoch_summaries']} epoch summaries of "
            f"{result['gradwatch_summary_bytes']} bytes pickled each, "
            f"{result['gradwatch_recent_steps']} recent step records, "
            f"{result['gradwatch_lost_steps']} lost steps"
        )
    if trace_epochs:
        per_epoch = result["python_heap_growth_kib_per_epoch"]
        print(
            f"  Python allocations from epoch {settle} to {args.epochs}: "
            f"{per_epoch['total']:.2f} KiB/epoch in all, "
            f"{per_epoch['keras_gradwatch']:.2f} KiB/epoch in keras_gradwatch"
        )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
