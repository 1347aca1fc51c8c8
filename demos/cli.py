"""Command line of the demos: `python -m demos [MODEL ...] --data DIR ...`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demos.data import DATA_ENV_VAR, DataError, prepare

DEFAULT_EPOCHS = 100
DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "demo-output"
MODEL_NUMBERS = (1, 2, 3, 4)
SUMMARY_MARKDOWN_FILE = "summary.md"
SUMMARY_JSON_FILE = "summary.json"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, received {value}")
    return value


def _model_number(text: str) -> int:
    # argparse checks `choices` against the empty default of nargs="*" and
    # rejects it, so the model numbers are checked here.
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in MODEL_NUMBERS:
        raise argparse.ArgumentTypeError(
            f"invalid model {text!r}, expected one of {' '.join(map(str, MODEL_NUMBERS))}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `python -m demos`."""
    parser = argparse.ArgumentParser(
        prog="python -m demos",
        description=(
            "Train the four models of the vanishing- and exploding-gradient "
            "experiment on the credit-card approval data with GradWatch attached, "
            "write each model's GradWatch report and gradient-flow figure, and "
            "print a summary that compares the findings with the results reported by "
            "the tutorial that this experiment comes from."
        ),
    )
    parser.add_argument(
        "models",
        nargs="*",
        type=_model_number,
        metavar="MODEL",
        help="models to train, from 1 2 3 4 (default: all four)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=os.environ.get(DATA_ENV_VAR),
        help=(
            "directory containing Credit_card.csv and Credit_card_label.csv "
            f"(default: the {DATA_ENV_VAR} environment variable)"
        ),
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_EPOCHS,
        help=f"maximum epochs per model; models 2 and 4 may stop early (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=(
            "seed of the oversampling, the train/validation split and "
            f"keras.utils.set_random_seed (default: {DEFAULT_SEED})"
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUTPUT_DIR,
        help=(
            "output directory; each model writes OUT/model_N/ with report.json, "
            "gradwatch.jsonl, gradient_flow.png, metrics.json and TensorBoard logs "
            f"in train/, which a rerun replaces (default: ./{DEFAULT_OUTPUT_DIR})"
        ),
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print no per-epoch progress lines, only each model's result and the summary",
    )
    return parser


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demos and return the exit status.

    The status is 0 on success and 2 when the data or the output directory is
    invalid. argparse exits with 2 itself on invalid arguments.
    """
    args = build_parser().parse_args(argv)
    models = list(dict.fromkeys(args.models)) or list(MODEL_NUMBERS)

    try:
        data = prepare(args.data, seed=args.seed)
    except DataError as error:
        print(f"python -m demos: error: {error}", file=sys.stderr)
        return 2

    output_dir = Path(args.out)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(
            f"python -m demos: error: cannot create output directory {output_dir}: "
            f"{error.strerror}. Pass a writable directory with --out DIR.",
            file=sys.stderr,
        )
        return 2

    # TensorFlow loads only after the data and the output directory were
    # checked, so that an error in either comes without TensorFlow's import time.
    from demos.models import MODEL_SPECS
    from demos.run import train_model
    from demos.summary import describe_findings, format_summary

    verbose = 0 if args.quiet else 2
    versions = _versions()
    print(
        f"Data: {data.balanced_rows} rows after oversampling, "
        f"{len(data.x_train)} training / {len(data.x_val)} validation; seed {args.seed}; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )

    started = time.perf_counter()
    results = []
    for number in models:
        spec = MODEL_SPECS[number]
        print(f"\n=== Model {number}: {spec.role} ===", flush=True)
        result = train_model(
            spec,
            data,
            epochs=args.epochs,
            seed=args.seed,
            output_dir=output_dir / f"model_{number}",
            verbose=verbose,
        )
        results.append(result)
        print(
            f"Model {number}: loss {result.loss:.4f}, accuracy {result.accuracy:.4f}, "
            f"val loss {result.val_loss:.4f}, val accuracy {result.val_accuracy:.4f}, "
            f"{result.epochs_run} epoch(s)"
        )
        if result.classification_report:
            print(result.classification_report)
        print("GradWatch findings:\n  " + describe_findings(result.findings).replace("\n", "\n  "))
        print(f"Outputs: {result.output_dir}", flush=True)
    wall_time = time.perf_counter() - started

    table = format_summary(results)
    print(f"\n=== Summary (seed {args.seed}, {args.epochs} epochs max, {wall_time:.0f} s) ===")
    print(table)

    (output_dir / SUMMARY_MARKDOWN_FILE).write_text(table + "\n")
    summary = {
        "seed": args.seed,
        "epochs": args.epochs,
        "models": models,
        "wall_time_s": round(wall_time, 1),
        "versions": versions,
        "results": [
            {
                "model": result.number,
                "loss": result.loss,
                "accuracy": result.accuracy,
                "val_loss": result.val_loss,
                "val_accuracy": result.val_accuracy,
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "findings": describe_findings(result.findings).splitlines(),
            }
            for result in results
        ],
    }
    (output_dir / SUMMARY_JSON_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
