"""Summarise GradWatch findings and compare each model with the tutorial."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from demos.run import ModelResult

# Finding kinds that mean the gradients themselves are broken. A model built to
# fix a gradient problem should show none of them.
GRADIENT_PROBLEM_KINDS = ("vanishing_gradient", "exploding_gradient", "dead_layer", "nonfinite")
MAX_LAYERS_SHOWN = 3


def _finding_kinds(findings: Iterable[dict]) -> set[str]:
    return {finding["kind"] for finding in findings}


def _layers_of(findings: Iterable[dict], kind: str) -> list[str]:
    layers: dict[str, None] = {}
    for finding in findings:
        if finding["kind"] == kind:
            layers.update(dict.fromkeys(finding.get("layers") or ()))
    return list(layers)


def _format_layers(layers: Sequence[str]) -> str:
    if len(layers) <= MAX_LAYERS_SHOWN:
        return ", ".join(layers)
    listed = ", ".join(layers[:MAX_LAYERS_SHOWN])
    return f"{listed} +{len(layers) - MAX_LAYERS_SHOWN} more"


def describe_findings(findings: Sequence[dict]) -> str:
    """Return one line per finding kind: the kind, its first step and its layers.

    Kinds keep the order of their first finding, and GradWatch lists findings
    most severe first.
    """
    if not findings:
        return "no findings"

    lines = []
    for kind in dict.fromkeys(finding["kind"] for finding in findings):
        first_step = min(finding["step"] for finding in findings if finding["kind"] == kind)
        layers = _layers_of(findings, kind)
        where = f"step {first_step}"
        if layers:
            where += f"; {_format_layers(layers)}"
        lines.append(f"{kind} ({where})")
    return "\n".join(lines)


def compare_with_tutorial(problem: str | None, findings: Sequence[dict]) -> str:
    """Say whether the findings show the gradient problem the tutorial names.

    Args:
        problem: `"vanishing"` or `"exploding"` for a model built to show that
            problem, `None` for a model built to fix one.
        findings: the finding dicts of `GradWatch.report()`.
    """
    kinds = _finding_kinds(findings)

    if problem is None:
        problems = [kind for kind in GRADIENT_PROBLEM_KINDS if kind in kinds]
        if not problems:
            return "agrees: no gradient problem found"
        return f"differs: the fixed model still has {', '.join(problems)} finding(s)"

    expected_kind = f"{problem}_gradient"
    if expected_kind in kinds:
        return f"agrees: {problem}-gradient finding"

    symptoms = []
    dead_layers = _layers_of(findings, "dead_layer")
    if dead_layers:
        symptoms.append(f"the model is saturated (dead layer: {_format_layers(dead_layers)})")
    elif "vanishing_gradient" in kinds:
        symptoms.append("the gradients vanish towards the input")
    loss_behaviour = [
        verb
        for kind, verb in (("loss_oscillation", "oscillates"), ("loss_stagnation", "stagnates"))
        if kind in kinds
    ]
    if loss_behaviour:
        symptoms.append("its loss " + " and ".join(loss_behaviour))
    if "nonfinite" in kinds:
        symptoms.append("it produced NaN or inf values")

    if problem == "exploding":
        statement = "no exploding-gradient finding: the measured gradient norms do not keep growing"
    else:
        statement = (
            "no vanishing-gradient finding: the measured norms do not shrink towards the input"
        )
    if symptoms:
        statement += "; " + _join_clauses(symptoms)
    return statement


def _join_clauses(clauses: Sequence[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _format_epochs(result: ModelResult) -> str:
    text = str(result.epochs_run)
    if result.best_epoch is not None:
        stopped = "early stop, " if result.epochs_run < result.epochs_requested else ""
        text += f" ({stopped}best {result.best_epoch})"
    return text


SUMMARY_HEADER = (
    "model",
    "tutorial reported",
    "loss",
    "accuracy",
    "val accuracy",
    "epochs",
    "GradWatch findings",
    "compared with the tutorial",
)


def summary_rows(results: Sequence[ModelResult]) -> list[tuple[str, ...]]:
    """Return one row of `SUMMARY_HEADER` cells per model."""
    rows = []
    for result in results:
        rows.append(
            (
                f"{result.number} ({result.role})",
                result.tutorial_result,
                f"{result.loss:.4f}",
                f"{result.accuracy:.4f}",
                f"{result.val_accuracy:.4f}",
                _format_epochs(result),
                describe_findings(result.findings).replace("\n", "; "),
                compare_with_tutorial(result.problem, result.findings),
            )
        )
    return rows


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Format a Markdown table whose columns are padded for plain-text reading."""
    widths = [len(cell) for cell in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    separator = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def format_summary(results: Sequence[ModelResult]) -> str:
    """Return the closing summary table of a demo run as Markdown."""
    return format_markdown_table(SUMMARY_HEADER, summary_rows(results))
