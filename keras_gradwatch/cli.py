"""The `gradwatch` command line: check, summarise and plot a run record.

```
gradwatch check LOG_DIR [--fail-on exploding,nonfinite] [--json]
gradwatch report LOG_DIR
gradwatch plot LOG_DIR -o gradient_flow.png
```

Each PATH is a `log_dir` given to `GradWatch(log_dir=...)`, its
`gradwatch.jsonl` or its `report.json` (see `keras_gradwatch.run_record`).
Exit status: 0 on success, 1 when `check` finds a finding of a kind in
`--fail-on`, 2 on a usage error, an unreadable or corrupt record, or a
failed output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from keras_gradwatch import findings as F
from keras_gradwatch.run_record import (
    ANY_KIND,
    NO_KIND,
    RecordError,
    RunRecord,
    load_run,
    select_kinds,
    to_strict_json,
)

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

DEFAULT_FAIL_ON = "exploding,nonfinite"
AGGREGATES = ("min", "median", "max", "last")


class CommandError(Exception):
    """An error that ends a command with exit status 2 and this message."""


def main(argv: Sequence[str] | None = None, prog: str = "gradwatch") -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`); return the exit status."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits 0 after --help and 2 on a usage error.
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"{args.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


def build_parser(prog: str = "gradwatch") -> argparse.ArgumentParser:
    """Build the argument parser of the `gradwatch` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Read the run records that GradWatch(log_dir=...) writes: check them for "
            "findings, print per-layer summaries, or plot the gradient flow."
        ),
        epilog=(
            "Exit status: 0 on success, 1 when check finds a finding of a failing kind "
            "(see check --help), 2 on a usage error or an unreadable or corrupt record."
        ),
    )
    parser.set_defaults(prog=prog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    path_help = "a log_dir given to GradWatch(log_dir=...), its gradwatch.jsonl or its report.json"

    check = commands.add_parser(
        "check",
        help="print the findings of runs; exit 1 if one of a kind in --fail-on occurred",
        description=(
            "Print the findings of each run as a table and exit with status 1 if any "
            "run has a finding of a kind in --fail-on, 0 if none has, or 2 if a record "
            "cannot be read."
        ),
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help=path_help)
    check.add_argument(
        "--fail-on",
        type=_kinds_argument,
        default=select_kinds(DEFAULT_FAIL_ON),
        metavar="KINDS",
        help=(
            "comma-separated finding kinds or groups whose presence makes the check "
            f"fail: kinds {', '.join(F.KINDS)}; groups {', '.join(F.POLICY_GROUPS)}; "
            f"{ANY_KIND!r} for every kind; {NO_KIND!r} to never fail "
            f"(default: {DEFAULT_FAIL_ON})"
        ),
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with every run's findings instead of tables",
    )
    check.set_defaults(run=run_check)

    report = commands.add_parser(
        "report",
        help="print per-layer gradient, weight and update statistics and the findings",
        description=(
            "Print, per layer, the first, last, min and max over the epochs of the "
            "gradient L2 norm (median of each epoch), the weight L2 norm (at each "
            "epoch end) and the update ratio ||delta w|| / ||w|| (median of each "
            "epoch), then the findings."
        ),
    )
    report.add_argument("path", metavar="PATH", help=path_help)
    report.set_defaults(run=run_report)

    plot = commands.add_parser(
        "plot",
        help="draw per-layer gradient norms against depth, one line per epoch, as PNG",
        description=(
            "Draw each layer's gradient L2 norm against its depth, input side at the "
            "left, one line per epoch, on a log scale. Norms that are exactly zero are "
            "drawn at the bottom edge as triangles, NaN and inf at the top edge as "
            "crosses. Needs matplotlib."
        ),
    )
    plot.add_argument("path", metavar="PATH", help=path_help)
    plot.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="PNG file to write (required)"
    )
    plot.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="median",
        help="which per-epoch aggregate of each layer's gradient norm to draw (default: median)",
    )
    plot.add_argument("--title", help="figure title (default: the model name and the record path)")
    plot.set_defaults(run=run_plot)
    return parser


def _version() -> str:
    import keras_gradwatch

    return keras_gradwatch.__version__


def _kinds_argument(text: str) -> frozenset[str]:
    try:
        return select_kinds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _load(path: str) -> RunRecord:
    try:
        return load_run(path)
    except RecordError as error:
        raise CommandError(str(error)) from None


# -- check ----------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    """Run `gradwatch check`; return 0, 1 (a finding in --fail-on) or 2 (an error)."""
    fail_on = args.fail_on
    records: list[RunRecord] = []
    errors: list[RecordError] = []
    for path in args.paths:
        try:
            records.append(load_run(path))
        except RecordError as error:
            errors.append(error)

    failing = [f for record in records for f in record.findings if f.kind in fail_on]
    if errors:
        status = EXIT_ERROR
    elif failing:
        status = EXIT_FINDINGS
    else:
        status = EXIT_OK

    for error in errors:
        print(f"{args.prog} {args.command}: error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(_check_json(records, errors, fail_on, status), indent=2))
        return status

    for index, record in enumerate(records):
        if index:
            print()
        _print_check(record, fail_on)
    if records:
        print()
    kinds = _kinds_text(fail_on)
    if failing:
        print(f"FAILED: {len(failing)} finding(s) of a kind in --fail-on ({kinds})")
    elif not errors:
        print(f"OK: no finding of a kind in --fail-on ({kinds})")
    if errors and len(args.paths) > 1:
        # With one path, the error line above already reports the failure.
        print(f"ERROR: {len(errors)} of {len(args.paths)} record(s) could not be read")
    return status


def _print_check(record: RunRecord, fail_on: frozenset[str]) -> None:
    print(_record_heading(record))
    for note in record.notes:
        print(f"note: {note}")
    if not record.findings:
        print("no findings")
        return
    print(_findings_table(record.findings, fail_on))
    failing = [f for f in record.findings if f.kind in fail_on]
    if failing:
        print()
        print("Findings that fail the check:")
        for finding in failing:
            print(f"- {finding.describe()}")


def _check_json(records, errors, fail_on, status) -> dict:
    return {
        "status": status,
        "fail_on": [kind for kind in F.KINDS if kind in fail_on],
        "records": [
            {
                "path": record.path,
                "format": record.format,
                "model": record.model,
                "complete": record.complete,
                "epochs_completed": len(record.epochs),
                "steps": record.steps,
                "notes": record.notes,
                "findings": [
                    {**to_strict_json(finding.to_dict()), "fails": finding.kind in fail_on}
                    for finding in record.findings
                ],
            }
            for record in records
        ],
        "errors": [{"path": error.path, "reason": error.reason} for error in errors],
    }


def _kinds_text(kinds: frozenset[str]) -> str:
    names = [kind for kind in F.KINDS if kind in kinds]
    return ", ".join(names) if names else "none"


# -- report ---------------------------------------------------------------

# (title, per-epoch statistic) of the tables of `gradwatch report`.
REPORT_TABLES = (
    ("Gradient L2 norm, median of each epoch", "grad_norm_median"),
    ("Weight L2 norm at the end of each epoch", "weight_norm_last"),
    ("Update ratio ||delta w|| / ||w||, median of each epoch", "update_ratio_median"),
)


def run_report(args: argparse.Namespace) -> int:
    """Run `gradwatch report`; return 0, or 2 if the record cannot be read."""
    record = _load(args.path)
    print(_record_heading(record))
    for note in record.notes:
        print(f"note: {note}")
    if not record.epochs:
        print()
        print("No epoch was completed, so there are no per-layer statistics.")
    for title, stat in REPORT_TABLES if record.epochs else ():
        print()
        print(f"{title} (first, last, min and max over {len(record.epochs)} epoch(s))")
        rows = []
        for depth, layer in enumerate(record.layers):
            values = record.layer_values(layer, stat)
            rows.append(
                [layer, str(depth)]
                + [format_number(v) for v in (values[0], values[-1], *_min_max(values))]
            )
        print(format_table(["layer", "depth", "first", "last", "min", "max"], rows))
    print()
    if record.findings:
        print("Findings")
        print(_findings_table(record.findings, frozenset()))
    else:
        print("No findings.")
    return EXIT_OK


def _min_max(values: list[float]) -> tuple[float, float]:
    """Return min and max ignoring NaN; NaN for both when every value is NaN."""
    present = [v for v in values if not math.isnan(v)]
    if not present:
        return math.nan, math.nan
    return min(present), max(present)


# -- plot -----------------------------------------------------------------


def run_plot(args: argparse.Namespace) -> int:
    """Run `gradwatch plot`; return 0, or 2 on an error."""
    record = _load(args.path)
    if not record.epochs:
        raise CommandError(f"{record.path}: no epoch was completed, so there is nothing to plot")
    title = args.title
    if title is None:
        title = f"Gradient flow of {record.model or 'the model'} ({record.path})"
    try:
        draw_gradient_flow(record, args.output, aggregate=args.aggregate, title=title)
    except OSError as error:
        raise CommandError(
            f"{args.output}: cannot write the figure ({error.strerror or error})"
        ) from None
    print(f"wrote {args.output}")
    return EXIT_OK


def draw_gradient_flow(
    record: RunRecord, output: str, aggregate: str = "median", title: str = ""
) -> None:
    """Draw per-layer gradient norms against depth, one line per epoch, into a PNG.

    The y axis is logarithmic. An exactly-zero norm is drawn one decade
    below the smallest positive norm, as a red triangle on the line. NaN
    and inf are drawn one decade above the largest finite norm, as red
    crosses, and break the line. Raises `CommandError` if matplotlib is
    not installed.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CommandError(
            "gradwatch plot needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib`"
        ) from None

    stat = f"grad_norm_{aggregate}"
    positions = list(range(len(record.layers)))
    series = [[epoch.value(layer, stat) for layer in record.layers] for epoch in record.epochs]
    finite_positive = [v for values in series for v in values if math.isfinite(v) and v > 0]
    low = min(finite_positive, default=1e-8)
    high = max(finite_positive, default=1.0)
    floor, ceiling = low / 10.0, high * 10.0

    # Drawing on a Figure with its own Agg canvas leaves pyplot's global
    # backend and figure list untouched.
    figure = Figure(figsize=(min(4.0 + 0.6 * len(positions), 16.0), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    first_epoch, last_epoch = record.epochs[0].epoch, record.epochs[-1].epoch
    color_scale = Normalize(vmin=first_epoch, vmax=max(last_epoch, first_epoch + 1))
    colormap = matplotlib.colormaps["viridis"]
    zeros_drawn = nonfinite_drawn = False

    for epoch, values in zip(record.epochs, series):
        color = colormap(color_scale(epoch.epoch))
        line = []
        for value in values:
            if value == 0:
                line.append(floor)
            elif math.isfinite(value):
                line.append(value)
            else:
                line.append(math.nan)  # a gap in the line
        axes.plot(positions, line, color=color, linewidth=1.2, marker="o", markersize=3)
        zeros = [x for x, v in zip(positions, values) if v == 0]
        if zeros:
            zeros_drawn = True
            axes.scatter(zeros, [floor] * len(zeros), marker="v", color="red", s=40, zorder=3)
        nonfinite = [x for x, v in zip(positions, values) if not math.isfinite(v)]
        if nonfinite:
            nonfinite_drawn = True
            axes.scatter(
                nonfinite, [ceiling] * len(nonfinite), marker="x", color="red", s=40, zorder=3
            )

    axes.set_yscale("log")
    axes.set_ylim(floor / 2.0, ceiling * 2.0)
    axes.set_xticks(positions)
    axes.set_xticklabels(record.layers, rotation=45, ha="right")
    axes.set_xlabel("layer (input side at the left)")
    axes.set_ylabel(f"gradient L2 norm ({aggregate} of the epoch)")
    axes.set_title(title, fontsize="medium")
    axes.grid(True, axis="y", which="major", alpha=0.3)
    legend = []
    if zeros_drawn:
        legend.append(
            Line2D([], [], marker="v", color="red", linestyle="", label=f"0 (drawn at {floor:.0e})")
        )
    if nonfinite_drawn:
        legend.append(
            Line2D(
                [],
                [],
                marker="x",
                color="red",
                linestyle="",
                label=f"NaN or inf (drawn at {ceiling:.0e})",
            )
        )
    if legend:
        axes.legend(handles=legend, fontsize="small", loc="best")
    colorbar = figure.colorbar(ScalarMappable(norm=color_scale, cmap=colormap), ax=axes)
    colorbar.set_label("epoch (from 0)")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    figure.tight_layout()
    figure.savefig(output, format="png")


# -- text output ----------------------------------------------------------


def _record_heading(record: RunRecord) -> str:
    parts = []
    if record.model:
        parts.append(f"model {record.model!r}")
    parts.append(f"{len(record.epochs)} epoch(s) completed")
    parts.append(f"{record.steps} step(s)")
    if record.complete is None:
        parts.append("report.json does not record whether training ended")
    elif record.complete:
        parts.append("complete")
    else:
        parts.append("incomplete")
    return f"{record.path}: {', '.join(parts)}"


def _findings_table(findings: list[F.Finding], fail_on: frozenset[str]) -> str:
    headers = ["kind", "step", "epoch", "value", "threshold", "count", "last step"]
    if fail_on:
        headers.append("fails")
    headers.append("layers")
    rows = []
    for finding in findings:
        row = [
            finding.kind,
            str(finding.step),
            str(finding.epoch),
            format_number(finding.value),
            format_number(finding.threshold),
            str(finding.count),
            str(finding.last_step),
        ]
        if fail_on:
            row.append("yes" if finding.kind in fail_on else "no")
        row.append(", ".join(finding.layers) if finding.layers else "(whole model)")
        rows.append(row)
    return format_table(headers, rows)


def format_number(value: float) -> str:
    """Format a statistic in at most 3 significant digits; non-finite as nan/inf."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Return rows as a plain-text table: columns two spaces apart, numbers right-aligned.

    A column is right-aligned when every cell below its header parses as a number.
    """
    columns = list(zip(headers, *rows)) if rows else [(header,) for header in headers]
    widths = [max(len(cell) for cell in column) for column in columns]
    numeric = [bool(rows) and all(_is_number(cell) for cell in column[1:]) for column in columns]

    def render(cells: list[str]) -> str:
        out = []
        for index, cell in enumerate(cells):
            if numeric[index]:
                out.append(cell.rjust(widths[index]))
            else:
                out.append(cell.ljust(widths[index]))
        return "  ".join(out).rstrip()

    lines = [render(headers), render(["-" * width for width in widths])]
    lines.extend(render(row) for row in rows)
    return "\n".join(lines)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
