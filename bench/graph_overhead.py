"""Time GradWatch's in-graph statistics alone, without any callback work on the host.

Builds the model twice in one process with the same seed: once with the
stock train function, once with the train function that GradWatch installs
(`GradWatch.on_train_begin` rebuilds it, and no callback runs afterwards).
It then calls both train functions directly, in alternating blocks of
`--block` steps, for `--rounds` rounds, so that drift in the machine's load
reaches both alike. The difference is the cost of the statistics that the
instrumented step computes and writes to its device buffer.

    python bench/graph_overhead.py --model mlp
    python bench/graph_overhead.py --model tiny --rounds 40 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# The benchmark measures this checkout's keras_gradwatch, installed or not.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH_DIR, os.path.dirname(BENCH_DIR)]
import workloads  # noqa: E402

from keras_gradwatch import GradientWarning, GradWatch  # noqa: E402

# Steps per timed block: about 0.1 to 0.3 s per block on two CPU cores.
DEFAULT_BLOCKS = {"tiny": 100, "mlp": 5, "cnn": 10, "lstm": 15}
WARMUP_CALLS = 5


def build_train_function(workload, instrumented: bool, seed: int, **watch_kwargs):
    """Return a model's train function and an endless iterator over its data."""
    keras.utils.set_random_seed(seed)
    x, y = workloads.make_data(workload, 4, seed)
    model = workload.build()
    model.fit(x, y, epochs=1, batch_size=workload.batch_size, verbose=0)
    if instrumented:
        watch = GradWatch(verbose=0, **watch_kwargs)
        watch.set_model(model)
        # Installs the instrumented train function, which stays in place
        # because `on_train_end` is never called.
        watch.on_train_begin()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(workload.batch_size).repeat()
    iterator = iter(dataset)
    train_function = model.train_function
    for _ in range(WARMUP_CALLS):
        train_function(iterator)
    return train_function, iterator


def time_block(train_function, iterator, steps: int) -> tuple[float, float]:
    """Run `steps` train steps and return wall and CPU milliseconds per step."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logs = train_function(iterator)
    logs["loss"].numpy()
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return 1000 * wall / steps, 1000 * cpu / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(workloads.WORKLOADS), default="tiny")
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds")
    parser.add_argument("--block", type=int, default=None, help="steps per block")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra-op and inter-op threads (default: 0, TensorFlow's own choice)",
    )
    parser.add_argument(
        "--weight-stats-freq",
        default=None,
        help="comma-separated `weight_stats_freq` values, one instrumented train function "
        "each (default: GradWatch's default only)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    warnings.simplefilter("ignore", GradientWarning)

    workload = workloads.WORKLOADS[args.model]
    block = args.block or DEFAULT_BLOCKS[args.model]
    functions = {"plain": build_train_function(workload, instrumented=False, seed=args.seed)}
    if args.weight_stats_freq is None:
        functions["gradwatch"] = build_train_function(workload, True, args.seed)
    else:
        for value in args.weight_stats_freq.split(","):
            functions[f"freq={value}"] = build_train_function(
                workload, True, args.seed, weight_stats_freq=int(value)
            )
    samples = {name: ([], []) for name in functions}
    for round_index in range(args.rounds):
        # Rotate the order each round, so drifting load reaches every function alike.
        shift = round_index % len(functions)
        order = list(functions)[shift:] + list(functions)[:shift]
        for name in order:
            wall, cpu = time_block(*functions[name], block)
            samples[name][0].append(wall)
            samples[name][1].append(cpu)

    plain_wall = statistics.median(samples["plain"][0])
    plain_cpu = statistics.median(samples["plain"][1])
    plain_min = min(samples["plain"][0])
    print(
        f"{args.model}: {args.rounds} rounds of {block} steps per train function, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    for name, (walls, cpus) in samples.items():
        print(
            f"  {name:10s} wall {statistics.median(walls):8.3f} ms/step "
            f"(ratio {statistics.median(walls) / plain_wall:.3f}), "
            f"min {min(walls):8.3f} (ratio {min(walls) / plain_min:.3f}), "
            f"CPU {statistics.median(cpus):8.3f} ms/step "
            f"(ratio {statistics.median(cpus) / plain_cpu:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
