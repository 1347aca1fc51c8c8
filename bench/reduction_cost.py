"""Time the reductions that GradWatch's statistics are made of, on one large tensor.

Each candidate runs in its own `tf.function` on a float32 tensor of
`--rows` x `--cols` entries, by default the size of the 2048 x 1024 kernel of
the benchmark MLP. It is timed over `--calls` calls, `--repeats` times, and
the median is printed. The `empty call` row times a function that returns a
constant, which is the cost of one call; the other rows include it.

    python bench/reduction_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# The benchmark measures this checkout's keras_gradwatch, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_gradwatch import stats  # noqa: E402


def candidates(variable: tf.Variable) -> dict:
    """Return the timed functions by name; each takes the flattened tensor."""

    def update_with_prior_copy(flat):
        prior = tf.identity(variable.read_value())
        with tf.control_dependencies([prior]):
            variable.assign_sub(tf.reshape(flat, variable.shape) * 1e-6)
        with tf.control_dependencies([variable.read_value()]):
            return stats.l2_norm(variable.read_value() - prior)

    def update_only(flat):
        variable.assign_sub(tf.reshape(flat, variable.shape) * 1e-6)
        return tf.constant(0.0)

    return {
        "empty call": lambda flat: tf.constant(0.0),
        "tf.norm": lambda flat: tf.norm(flat),
        "sum of squares by matmul": stats.sum_of_squares,
        "max(abs(x))": lambda flat: tf.reduce_max(tf.abs(flat)),
        "max(max(x), -min(x))": stats.max_abs,
        "count of NaN/Inf": stats.nonfinite_count,
        "count of zeros": stats.zero_count,
        "histogram, arithmetic (stats.histogram)": stats.histogram,
        "histogram, tf.histogram_fixed_width": lambda flat: tf.histogram_fixed_width(
            flat, tf.stack([tf.reduce_min(flat), tf.reduce_max(flat)]), stats.HISTOGRAM_BUCKETS
        ),
        "optimizer-like update": update_only,
        "update + norm of the update (prior copy)": update_with_prior_copy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per candidate")
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads (default: TensorFlow's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    tensor = tf.random.normal([args.rows * args.cols], seed=0)
    variable = tf.Variable(tf.random.normal([args.rows, args.cols], seed=1))
    print(f"{args.rows} x {args.cols} float32, {args.calls} calls x {args.repeats} repeats")
    for name, function in candidates(variable).items():
        traced = tf.function(function)
        traced(tensor).numpy()
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.calls):
                result = traced(tensor)
            result.numpy()
            timings.append((time.perf_counter() - start) / args.calls * 1000)
        print(f"  {name:42s} {statistics.median(timings):7.3f} ms per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
