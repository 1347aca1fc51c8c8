"""Benchmark GradWatch against plain `fit`, stock TensorBoard and a naive callback.

Every measurement runs `bench/measure.py` in a fresh Python process, so the
peak RSS it reports belongs to one (model, configuration) alone. Repeats run
round-robin: repeat 1 measures every case, then repeat 2, and so on, and the
order of the configurations rotates by one each repeat, so that drift in the
machine's load reaches every configuration alike. See docs/benchmarks.md.

    python bench/run.py                          # every model and configuration
    python bench/run.py --models mlp --configs plain,gradwatch --repeats 3
    python bench/run.py --quick                  # smoke run, a few minutes
    python bench/run.py --output bench-results   # also write JSON and Markdown
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
MEASURE_SCRIPT = os.path.join(BENCH_DIR, "measure.py")

sys.path.insert(0, BENCH_DIR)
from cases import CONFIGS, MODELS  # noqa: E402

# Steps per epoch and epochs of the timed fit (the first epoch is not
# counted). `tiny` uses the tutorial's 65 steps per epoch (2,059 training
# rows in batches of 32), so epoch-end work weighs as much as it does there.
# The others run about 2 to 3 s of timed steps on two CPU cores.
DEFAULT_SCHEDULE = {
    "tiny": (65, 8),
    "mlp": (20, 4),
    "cnn": (30, 4),
    "lstm": (40, 4),
}
QUICK_SCHEDULE = (5, 2)
DEFAULT_REPEATS = 5
QUICK_REPEATS = 1

# A measurement that takes longer than this is recorded as failed.
MEASURE_TIMEOUT_S = 600

TIME_LABEL = "time per step"
MEMORY_LABEL = "peak RSS"


@dataclass(frozen=True)
class Target:
    """A bound on the ratio of `config` to `plain` (median over median) for some models.

    The ratio must be at most `limit` or, when `cheaper_than` names a
    configuration instead, below that configuration's own ratio.
    """

    config: str
    models: tuple[str, ...]
    quantity: str = TIME_LABEL
    limit: float | None = None
    cheaper_than: str | None = None


TARGETS = (
    Target("gradwatch", ("tiny",), limit=1.10),
    Target("gradwatch", ("mlp", "cnn", "lstm"), limit=1.03),
    Target("gradwatch_all", ("tiny",), limit=1.25),
    Target("gradwatch_all", ("mlp", "cnn", "lstm"), limit=1.05),
    Target("gradwatch_all", MODELS, cheaper_than="tensorboard"),
    Target("gradwatch", ("mlp",), MEMORY_LABEL, limit=1.05),
    Target("gradwatch_all", ("mlp",), MEMORY_LABEL, limit=1.05),
)


def parse_list(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """Split a comma-separated option value and reject names not in `allowed`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid {option} {text!r}: expected a comma-separated list of {', '.join(allowed)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time GradWatch against plain fit, TensorBoard and a naive callback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Configurations: {', '.join(CONFIGS)}. Models: {', '.join(MODELS)}.",
    )
    parser.add_argument(
        "--models",
        type=lambda text: parse_list(text, MODELS, "--models"),
        default=list(MODELS),
        help="comma-separated models to run (default: all)",
    )
    parser.add_argument(
        "--configs",
        type=lambda text: parse_list(text, CONFIGS, "--configs"),
        default=list(CONFIGS),
        help="comma-separated configurations (default: all); ratios need 'plain'",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"fresh processes per case (default: {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per epoch for every model (default: per model, see DEFAULT_SCHEDULE)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the timed fit, the first not counted (default: per model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra-op and inter-op threads per measurement "
        "(default: 0, TensorFlow's own choice)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SCHEDULE[0]} steps x {QUICK_SCHEDULE[1]} epochs, "
        f"{QUICK_REPEATS} repeat, unless given explicitly",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="directory to write results.json and results.md into (created if missing)",
    )
    return parser


def schedule_for(model: str, args) -> tuple[int, int]:
    """Return (steps per epoch, timed epochs) for `model` under the options."""
    steps, epochs = QUICK_SCHEDULE if args.quick else DEFAULT_SCHEDULE[model]
    if args.steps is not None:
        steps = args.steps
    if args.epochs is not None:
        epochs = args.epochs
    return steps, epochs


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def git_revision() -> str | None:
    """Return the checkout's commit, with "+changes" if the tree is modified."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


def describe_machine() -> dict:
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": package_version("tensorflow", "tensorflow-cpu"),
        "keras": package_version("keras"),
        "numpy": package_version("numpy"),
        "tensorboard": package_version("tensorboard"),
        "git_revision": git_revision(),
    }


def run_measurement(
    model: str, config: str, steps: int, epochs: int, seed: int, threads: int
) -> dict:
    """Run measure.py in a fresh process and return its result, or an `error` entry."""
    command = [
        sys.executable,
        MEASURE_SCRIPT,
        f"--model={model}",
        f"--config={config}",
        f"--steps={steps}",
        f"--epochs={epochs}",
        f"--seed={seed}",
        f"--threads={threads}",
    ]
    load_before = os.getloadavg()[0]

    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S, cwd=REPO_DIR
        )
    except subprocess.TimeoutExpired:
        return {
            "model": model,
            "config": config,
            "error": f"timed out after {MEASURE_TIMEOUT_S} s",
            "load_1min": load_before,
        }
    process_seconds = time.perf_counter() - start

    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip().splitlines()[-5:]
        return {
            "model": model,
            "config": config,
            "error": f"exit status {completed.returncode}: " + " | ".join(tail),
            "load_1min": load_before,
        }

    result = json.loads(lines[-1])
    result["load_1min"] = load_before
    result["process_seconds"] = process_seconds
    return result


def interquartile_range(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def summarise(runs: list[dict], models: list[str], configs: list[str]) -> list[dict]:
    """Aggregate the repeats of each (model, config) and compare them to `plain`.

    `ratio` is the median time of the case over the median time of `plain`.
    `paired_ratio_min`/`max` divide each repeat by `plain` of the same repeat,
    which shows how far the ratio moves with the machine's load. `cpu_ratio`
    is the same comparison for process CPU time per step.
    """
    rows = []
    for model in models:
        by_config = {}
        for config in configs:
            ok = [r for r in runs if r["model"] == model and r["config"] == config]
            by_config[config] = [r for r in ok if "error" not in r]
        plain = by_config.get("plain") or []
        plain_ms = statistics.median(r["ms_per_step"] for r in plain) if plain else None
        plain_rss = statistics.median(r["peak_rss_mib"] for r in plain) if plain else None
        plain_cpu = statistics.median(r["cpu_ms_per_step"] for r in plain) if plain else None
        plain_by_repeat = {r["repeat"]: r for r in plain}
        for config in configs:
            good = by_config[config]
            failed = [
                r for r in runs if r["model"] == model and r["config"] == config and "error" in r
            ]
            row = {"model": model, "config": config, "runs": len(good), "failed": len(failed)}
            if failed:
                row["errors"] = sorted({r["error"] for r in failed})
            if not good:
                rows.append(row)
                continue
            times = sorted(r["ms_per_step"] for r in good)
            rss = [r["peak_rss_mib"] for r in good]
            q1, q3 = interquartile_range(times)
            row.update(
                steps_per_epoch=good[0]["steps_per_epoch"],
                timed_steps=good[0]["timed_steps"],
                ms_per_step_median=statistics.median(times),
                ms_per_step_min=times[0],
                ms_per_step_max=times[-1],
                ms_per_step_q1=q1,
                ms_per_step_q3=q3,
                cpu_ms_per_step_median=statistics.median(r["cpu_ms_per_step"] for r in good),
                peak_rss_mib_median=statistics.median(rss),
            )
            if plain_ms:
                row["ratio"] = row["ms_per_step_median"] / plain_ms
                paired = [
                    r["ms_per_step"] / plain_by_repeat[r["repeat"]]["ms_per_step"]
                    for r in good
                    if r["repeat"] in plain_by_repeat
                ]
                if paired:
                    row["paired_ratio_min"] = min(paired)
                    row["paired_ratio_max"] = max(paired)
            if plain_cpu:
                row["cpu_ratio"] = row["cpu_ms_per_step_median"] / plain_cpu
            if plain_rss:
                row["rss_ratio"] = row["peak_rss_mib_median"] / plain_rss
            rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Compare the summary with TARGETS, skipping targets whose cases did not run."""
    index = {(row["model"], row["config"]): row for row in rows}
    checks = []
    for target in TARGETS:
        key = "ratio" if target.quantity == TIME_LABEL else "rss_ratio"
        for model in target.models:
            row = index.get((model, target.config))
            if row is None or key not in row:
                continue
            value = row[key]
            check = {
                "model": model,
                "config": target.config,
                "quantity": target.quantity,
                "value": value,
            }
            if target.limit is not None:
                check["limit"] = target.limit
                check["met"] = value <= target.limit
                check["condition"] = f"<= {target.limit:.2f}"
            else:
                other = index.get((model, target.cheaper_than))
                if other is None or key not in other:
                    continue
                check["limit"] = other[key]
                check["met"] = value < other[key]
                check["condition"] = f"< {target.cheaper_than} ({other[key]:.2f})"
            checks.append(check)
    return checks


def format_table(rows: list[dict]) -> str:
    header = (
        "| model | config | timed steps | median ms/step | min–max ms/step | ratio to plain "
        "| paired ratio range | CPU ratio | peak RSS MiB | RSS ratio |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [header]
    for row in rows:
        if "ms_per_step_median" not in row:
            lines.append(f"| {row['model']} | {row['config']} | failed: {row.get('errors')} |")
            continue
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "–"
        paired = (
            f"{row['paired_ratio_min']:.2f}–{row['paired_ratio_max']:.2f}"
            if "paired_ratio_min" in row
            else "–"
        )
        cpu_ratio = f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else "–"
        rss_ratio = f"{row['rss_ratio']:.3f}" if "rss_ratio" in row else "–"
        lines.append(
            f"| {row['model']} | {row['config']} "
            f"| {row['timed_steps']} ({row['steps_per_epoch']}/epoch) "
            f"| {row['ms_per_step_median']:.2f} "
            f"| {row['ms_per_step_min']:.2f}–{row['ms_per_step_max']:.2f} "
            f"| {ratio} | {paired} | {cpu_ratio} "
            f"| {row['peak_rss_mib_median']:.0f} | {rss_ratio} |"
        )
    return "\n".join(lines)


def format_targets(checks: list[dict]) -> str:
    lines = [
        "| model | config | quantity | ratio to plain | target | result |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for check in checks:
        result = "met" if check["met"] else "missed"
        lines.append(
            f"| {check['model']} | {check['config']} | {check['quantity']} "
            f"| {check['value']:.3f} | {check['condition']} | {result} |"
        )
    return "\n".join(lines)


def format_machine(
    machine: dict, load: dict, wall_seconds: float, command: str, threads: int
) -> str:
    thread_text = f"{threads} (set with --threads)" if threads else "TensorFlow's default"
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- CPU: {machine['cpu_model']}, {machine['usable_cpus']} usable of "
            f"{machine['logical_cpus']} logical CPUs, {machine['memory_gib']:.1f} GiB memory",
            f"- Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
            f"Keras {machine['keras']}, NumPy {machine['numpy']}, "
            f"TensorBoard {machine['tensorboard']}; {machine['platform']}",
            f"- checkout: {machine['git_revision']}",
            f"- TensorFlow intra-op and inter-op threads: {thread_text}",
            f"- 1-minute load average before each measurement: min {load['min']:.2f}, "
            f"median {load['median']:.2f}, max {load['max']:.2f}",
            f"- wall time: {wall_seconds / 60:.1f} min",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    repeats = args.repeats
    if repeats is None:
        repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if repeats < 1:
        parser.error(f"invalid --repeats {repeats}: expected at least 1")
    if args.epochs is not None and args.epochs < 2:
        parser.error(
            f"invalid --epochs {args.epochs}: expected at least 2, because the first "
            "timed epoch is not counted"
        )
    if args.steps is not None and args.steps < 1:
        parser.error(f"invalid --steps {args.steps}: expected at least 1")

    command = shlex.join([os.path.relpath(sys.argv[0], REPO_DIR), *sys.argv[1:]])
    machine = describe_machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"{machine['cpu_model']}, {machine['usable_cpus']} CPUs, TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    runs = []
    total = repeats * len(args.models) * len(args.configs)
    wall_start = time.perf_counter()
    for repeat in range(repeats):
        shift = repeat % len(args.configs)
        configs = args.configs[shift:] + args.configs[:shift]
        for model in args.models:
            steps, epochs = schedule_for(model, args)
            for config in configs:
                result = run_measurement(model, config, steps, epochs, args.seed, args.threads)
                result["repeat"] = repeat
                runs.append(result)
                if "error" in result:
                    status = f"FAILED: {result['error']}"
                else:
                    status = (
                        f"{result['ms_per_step']:.2f} ms/step, "
                        f"{result['peak_rss_mib']:.0f} MiB, {result['process_seconds']:.0f} s"
                    )
                print(
                    f"[{len(runs)}/{total}] repeat {repeat + 1} {model} {config}: {status} "
                    f"(load {result['load_1min']:.2f})",
                    flush=True,
                )
    wall_seconds = time.perf_counter() - wall_start

    rows = summarise(runs, args.models, args.configs)
    checks = check_targets(rows)
    loads = [r["load_1min"] for r in runs]
    load = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    table = format_table(rows)
    targets = format_targets(checks)
    machine_text = format_machine(machine, load, wall_seconds, command, args.threads)
    print()
    print(table)
    print()
    print(targets)
    print()
    print(machine_text)

    if args.output:
        os.makedirs(args.output, exist_ok=True)
        document = {
            "started_utc": started.isoformat(timespec="seconds"),
            "command": command,
            "wall_seconds": wall_seconds,
            "repeats": repeats,
            "seed": args.seed,
            "threads": args.threads,
            "machine": machine,
            "load_1min": load,
            "summary": rows,
            "targets": checks,
            "runs": runs,
        }
        with open(os.path.join(args.output, "results.json"), "w") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
        with open(os.path.join(args.output, "results.md"), "w") as file:
            file.write(f"# Benchmark results, {started:%Y-%m-%d %H:%M} UTC\n\n")
            file.write(machine_text + "\n\n" + table + "\n\n" + targets + "\n")
        print(f"\nWrote {args.output}/results.json and {args.output}/results.md")
    failed = sum(1 for r in runs if "error" in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
