"""Run record: `gradwatch.jsonl` and `report.json` under `log_dir`, and their reader.

`RunRecordSink` writes two files while `fit` runs:

- `gradwatch.jsonl`, JSON Lines, one object per line with a `"type"` key.
  A `run_start` line comes when training begins and a `finding` line when a
  finding is first detected. `step` lines sample the steps (only with
  `update_freq="batch"` or an int), an `epoch` line follows each epoch, and a
  `run_end` line comes when training ends. Every line is flushed as it is
  written and the file is fsync-ed at each epoch end, so a process that dies
  leaves every line written before it died.
- `report.json`, the value of `GradWatch.report()`, replaced atomically when
  training begins, at the end of the first epoch, at later epoch ends once
  `REPORT_INTERVAL` seconds have passed since the last replacement, and when
  training ends. Its size grows with the epochs, so rewriting it at every
  epoch end would cost time that grows with the square of the epochs. The
  JSON Lines file gets every epoch as it ends.

Each `fit` call starts both files anew, as `keras.callbacks.CSVLogger` does
by default, so that they always describe the same run. Non-finite numbers are
written as the strings "nan", "inf" and "-inf", which keeps both files strict
JSON. docs/report-format.md lists every field.

`load_run` reads either file, or a `log_dir` containing them, into a
`RunRecord`. A record whose last line was cut off by a crash reads up to its
last complete line. Anything else that cannot be read raises `RecordError`.

The writer runs inside `fit`, where Keras and TensorFlow are loaded. The
reader and the `gradwatch` command line use only the standard library, so this
module imports nothing else at import time.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from keras_gradwatch import findings as F
from keras_gradwatch.sinks import Sink

RECORD_FILE = "gradwatch.jsonl"
REPORT_FILE = "report.json"
# Minimum seconds between two replacements of report.json at epoch ends.
REPORT_INTERVAL = 10.0
# Version of the line format of `gradwatch.jsonl`; `report.json` carries the
# version of `GradWatch.report()` in its own `version` field.
RECORD_VERSION = 1
SUPPORTED_REPORT_VERSION = 1
# Fields of `GradWatch.report()` that the run_end line leaves out, because the
# run_start and epoch lines already contain them.
RUN_END_OMITS = ("version", "thresholds", "policies", "layers", "epochs")

# Names accepted where finding kinds are selected: every kind, every policy
# group (all kinds of that group), "any" (all kinds) and "none" (no kind).
ANY_KIND = "any"
NO_KIND = "none"


class RecordError(ValueError):
    """A run record that cannot be read: missing, unreadable or corrupt.

    Attributes:
        path: the file or directory that was being read.
        reason: what is wrong with it, without the path.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def select_kinds(names: Iterable[str] | str) -> frozenset[str]:
    """Return the finding kinds named by `names`.

    Each name is a finding kind (`"exploding_gradient"`), a policy group
    (`"exploding"`, `"vanishing"`, `"nonfinite"`, `"loss"`), `"any"` for all
    kinds or `"none"` for no kind. A string is split at commas. Raises
    `ValueError` naming the first unknown name.
    """
    if isinstance(names, str):
        names = names.split(",")
    kinds: set[str] = set()
    for raw in names:
        name = raw.strip()
        if name == ANY_KIND:
            kinds.update(F.KINDS)
        elif name == NO_KIND:
            continue
        elif name in F.KINDS:
            kinds.add(name)
        elif name in F.POLICY_GROUPS:
            kinds.update(kind for kind, info in F.KINDS.items() if info.group == name)
        else:
            raise ValueError(
                f"Unknown finding kind or group {name!r}. Expected a kind "
                f"({', '.join(sorted(F.KINDS))}), a group ({', '.join(F.POLICY_GROUPS)}), "
                f"{ANY_KIND!r} or {NO_KIND!r}."
            )
    return frozenset(kinds)


# -- writer ---------------------------------------------------------------


class RunRecordSink(Sink):
    """Writes `gradwatch.jsonl` and `report.json` under `log_dir`.

    Args:
        log_dir: an existing, writable directory. `GradWatch(log_dir=...)`
            creates it and passes it here.
    """

    name = "run_record"

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = os.fspath(log_dir)
        self.record_path = os.path.join(self.log_dir, RECORD_FILE)
        self.report_path = os.path.join(self.log_dir, REPORT_FILE)
        self._file = None
        self._update_freq: str | int = "epoch"
        self._epochs_written = 0
        self._report_epochs = 0
        self._report_time = 0.0

    def open(self, watch) -> None:
        import keras

        import keras_gradwatch

        self._update_freq = watch.update_freq
        # The report of a run that has not started yet contains the layout,
        # thresholds and policies in the same form as `report.json`.
        report = watch.report()
        self._file = open(self.record_path, "w", encoding="utf-8")
        self._write(
            {
                "type": "run_start",
                "version": RECORD_VERSION,
                "time": time.time(),
                "model": watch.model.name,
                "gradwatch_version": keras_gradwatch.__version__,
                "keras_version": keras.__version__,
                "update_freq": watch.update_freq,
                "layers": report["layers"],
                "thresholds": report["thresholds"],
                "policies": report["policies"],
            }
        )
        # Replacing a previous run's report keeps both files on the same run.
        self._write_report(report)

    def on_step(self, record) -> None:
        if self._update_freq == "epoch":
            return
        if self._update_freq != "batch" and record.step % self._update_freq != 0:
            return
        self._write(
            {
                "type": "step",
                "step": record.step,
                "epoch": record.epoch,
                "loss": record.loss,
                "global_grad_norm": record.global_grad_norm,
                "update_skipped": record.update_skipped,
            }
        )

    def on_finding(self, finding) -> None:
        self._write({"type": "finding", **finding.to_dict()})

    def on_epoch(self, summary, watch) -> None:
        self._write_new_epochs(watch)
        self._sync()
        due = time.monotonic() - self._report_time >= REPORT_INTERVAL
        if self._report_epochs == 0 or due:
            self._write_report(watch.report())

    def close(self, watch) -> None:
        if self._file is None:
            return
        report = watch.report()
        # A "raise" policy that fires in the epoch-end checks ends the run
        # before `on_epoch`, so that epoch's line is written here.
        self._write_new_epochs(watch)
        model = getattr(watch, "model", None)
        totals = {key: value for key, value in report.items() if key not in RUN_END_OMITS}
        self._write(
            {
                "type": "run_end",
                "time": time.time(),
                "stop_training": bool(getattr(model, "stop_training", False)),
                **totals,
            }
        )
        self._sync()
        self._file.close()
        self._file = None
        # The run_end line goes first: a reader prefers gradwatch.jsonl, which
        # is then complete even if the process dies before report.json is replaced.
        self._write_report(report)

    def _write_new_epochs(self, watch) -> None:
        """Write an epoch line for each epoch of `watch` not written yet."""
        summaries = watch.epochs[self._epochs_written :]
        if not summaries:
            return
        counts = [_finding_counts(finding.to_dict()) for finding in watch.findings]
        for summary in summaries:
            entry = watch.epoch_report(summary)
            self._write({"type": "epoch", **entry, "time": time.time(), "findings": counts})
        self._epochs_written += len(summaries)

    def _write(self, data: dict) -> None:
        line = json.dumps(to_strict_json(data), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _write_report(self, report: dict) -> None:
        # The temporary file lives in the same directory, so os.replace is an
        # atomic rename: a reader sees the old report or the new one, never a mix.
        temporary = os.path.join(self.log_dir, f".{REPORT_FILE}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(to_strict_json(report), file, indent=2, allow_nan=False)
                file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.report_path)
            self._report_epochs = len(report["epochs"])
            self._report_time = time.monotonic()
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise


def _finding_counts(finding: dict) -> dict:
    """Return the key and the repeat counters of a finding dict."""
    return {
        "kind": finding["kind"],
        "detector": finding["detector"],
        "layers": finding["layers"],
        "count": finding["count"],
        "last_step": finding["last_step"],
        "last_value": finding["last_value"],
    }


def to_strict_json(value):
    """Return `value` with numpy scalars made Python numbers and non-finite floats text.

    Dicts, lists and tuples are converted recursively (tuples become lists),
    so `json.dumps(..., allow_nan=False)` accepts the result.
    """
    if isinstance(value, dict):
        return {str(key): to_strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(item) for item in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if hasattr(value, "dtype") and hasattr(value, "item"):
        # A numpy scalar: item() returns the Python bool, int or float.
        return to_strict_json(value.item())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return F.json_number(value)
    raise TypeError(f"Cannot write a value of type {type(value).__name__} to a run record")


# -- reader ---------------------------------------------------------------


@dataclass
class EpochStats:
    """Aggregates of one epoch, as in the `epochs` entries of `report.json`.

    Attributes:
        epoch: epoch index, from 0.
        steps: steps recorded in the epoch.
        first_step, last_step: global step indices of its first and last step.
        loss_mean: mean of the finite batch losses.
        global_grad_norm_median: median over the steps of the global gradient
            L2 norm.
        skipped_updates: steps whose optimizer update was skipped.
        layers: per layer name, `<stat>_<aggregate>` values, for example
            `layers["dense"]["grad_norm_median"]`; see docs/report-format.md.
        time: Unix time when the epoch line was written; None in `report.json`.
    """

    epoch: int
    steps: int
    first_step: int
    last_step: int
    loss_mean: float
    global_grad_norm_median: float
    skipped_updates: int
    layers: dict[str, dict[str, float]]
    time: float | None = None

    def value(self, layer: str, stat: str) -> float:
        """Return `layers[layer][stat]`, or NaN when the epoch has no such value."""
        return self.layers.get(layer, {}).get(stat, math.nan)


@dataclass
class StepStats:
    """One `step` line: the batch loss and global gradient L2 norm of a step."""

    step: int
    epoch: int
    loss: float
    global_grad_norm: float
    update_skipped: bool


@dataclass
class RunRecord:
    """The contents of a run record, as read by `load_run`.

    Attributes:
        path: the file that was read.
        format: `"jsonl"` for `gradwatch.jsonl`, `"report"` for `report.json`.
        version: the format version written in the file.
        model: the model's name; None in `report.json`, which does not hold it.
        layers: layer names in forward order (input side first).
        thresholds: the `Thresholds` values of the run, by field name.
        policies: the policy (`"warn"`, `"stop"` or `"raise"`) per group.
        epochs: the completed epochs, in order.
        findings: the findings, most severe first, then by first step. Their
            `count`, `last_step` and `last_value` are those of the latest
            epoch line when the record has no `run_end` line.
        steps: steps trained, as far as the record shows.
        step_stats: the sampled `step` lines (empty unless `update_freq` was
            `"batch"` or an int).
        complete: True when `gradwatch.jsonl` ends with a `run_end` line,
            which `GradWatch` writes when `fit` ends, also when a `"stop"` or
            `"raise"` policy ended it. False when it has none: the process
            died, or `fit` raised before its end. None for `report.json`,
            which does not show it.
        notes: things the reader skipped or could not tell, for display.
    """

    path: str
    format: str
    version: int
    model: str | None
    layers: list[str]
    thresholds: dict
    policies: dict
    epochs: list[EpochStats]
    findings: list[F.Finding]
    steps: int
    step_stats: list[StepStats] = field(default_factory=list)
    complete: bool | None = None
    notes: list[str] = field(default_factory=list)

    def layer_values(self, layer: str, stat: str) -> list[float]:
        """Return `stat` (e.g. `"grad_norm_median"`) of `layer`, one value per epoch."""
        return [epoch.value(layer, stat) for epoch in self.epochs]

    def findings_of(self, kinds: Iterable[str] | str) -> list[F.Finding]:
        """Return the findings whose kind is selected by `kinds` (see `select_kinds`)."""
        selected = select_kinds(kinds)
        return [finding for finding in self.findings if finding.kind in selected]


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read a run record: a `log_dir`, a `gradwatch.jsonl` or a `report.json`.

    In a directory, `gradwatch.jsonl` is read if present, else `report.json`.
    A file ending in `.jsonl` is read as JSON Lines. Another file is read as
    JSON Lines if its first line is a `run_start` object, else as a report.

    Raises:
        RecordError: the path does not exist or cannot be read, contains no
            record, is not valid JSON, lacks a field or has a field of the
            wrong type, or was written by a newer format version. The
            message names the file and, for JSON Lines, the line.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (RECORD_FILE, REPORT_FILE):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return load_run(candidate)
        raise RecordError(
            path,
            f"the directory contains neither {RECORD_FILE} nor {REPORT_FILE}; pass the "
            "log_dir given to GradWatch(log_dir=...) or one of those files",
        )
    if not os.path.exists(path):
        raise RecordError(path, "not found")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise RecordError(path, f"cannot be read ({error.strerror or error})") from error
    if not data.strip():
        raise RecordError(path, "the file is empty")
    if path.endswith(".jsonl") or _starts_with_run_start(data):
        return _parse_jsonl(path, data)
    return _parse_report(path, data)


def _starts_with_run_start(data: bytes) -> bool:
    first_line = data.lstrip().split(b"\n", 1)[0]
    try:
        value = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == "run_start"


class _FieldError(Exception):
    """A missing or mistyped field; the caller adds the file and line."""


def _parse_jsonl(path: str, data: bytes) -> RunRecord:
    lines = data.split(b"\n")
    # Every line the writer completes ends with a newline, so text after the
    # last newline is a line whose writing was cut off.
    tail = lines.pop()
    parsed: list[tuple[int, dict]] = []
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            parsed.append((number, _parse_line(path, number, raw)))
    notes = []
    if tail.strip():
        number = len(lines) + 1
        try:
            parsed.append((number, _parse_line(path, number, tail)))
        except RecordError:
            notes.append(
                f"line {number} is incomplete ({len(tail)} bytes without a line end) and was "
                "ignored; the training process stopped while writing it"
            )
    if not parsed:
        raise RecordError(path, "contains no complete line; the run's first line was cut off")

    start_number, start = parsed[0]
    if start["type"] != "run_start":
        raise RecordError(
            path, f"line {start_number}: expected a run_start line first, found {start['type']!r}"
        )
    try:
        record = _record_from_start(path, start)
    except _FieldError as error:
        raise RecordError(path, f"line {start_number} (run_start): {error}") from None
    record.notes.extend(notes)

    found: dict[tuple, F.Finding] = {}
    for number, line in parsed[1:]:
        kind = line["type"]
        try:
            if kind == "run_start":
                raise _FieldError("a second run_start line, but a record file contains one run")
            if record.complete:
                raise _FieldError(f"a {kind} line after the run_end line")
            if kind == "step":
                record.step_stats.append(_step_from_dict(line))
            elif kind == "finding":
                finding = _finding_from_dict(line)
                found[finding.key] = finding
            elif kind == "epoch":
                record.epochs.append(_epoch_from_dict(line))
                for counts in _list(line, "findings", required=False):
                    _update_counts(found, counts)
            elif kind == "run_end":
                record.steps = _int(line, "steps")
                for data_ in _list(line, "findings"):
                    finding = _finding_from_dict(data_)
                    found[finding.key] = finding
                record.complete = True
            else:
                record.notes.append(f"line {number}: unknown line type {kind!r} ignored")
        except _FieldError as error:
            raise RecordError(path, f"line {number} ({kind}): {error}") from None

    record.findings = _sorted_findings(found.values())
    if not record.complete:
        record.steps = _steps_seen(record)
        record.notes.append(
            "the record has no run_end line, so fit did not reach its end (the process "
            "died or fit raised); the record shows training up to its last complete line"
        )
    return record


def _parse_line(path: str, number: int, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(path, f"line {number} is not UTF-8 text ({error.reason})") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        reason = getattr(error, "msg", str(error))
        column = getattr(error, "colno", None)
        where = f" at column {column}" if column else ""
        raise RecordError(path, f"line {number} is not valid JSON ({reason}{where})") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RecordError(path, f"line {number} is not a JSON object with a string 'type' field")
    return value


def _record_from_start(path: str, start: dict) -> RunRecord:
    version = _int(start, "version")
    if version > RECORD_VERSION:
        raise _FieldError(
            f"record format version {version} is newer than this reader's "
            f"{RECORD_VERSION}; upgrade keras_gradwatch to read it"
        )
    model = start.get("model")
    return RunRecord(
        path=path,
        format="jsonl",
        version=version,
        model=model if isinstance(model, str) else None,
        layers=_layer_names(start),
        thresholds=_dict(start, "thresholds"),
        policies=_dict(start, "policies"),
        epochs=[],
        findings=[],
        steps=0,
        complete=False,
    )


def _parse_report(path: str, data: bytes) -> RunRecord:
    try:
        report = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RecordError(path, f"the file is not UTF-8 text ({error.reason})") from None
    except ValueError as error:
        reason = getattr(error, "msg", str(error))
        line = getattr(error, "lineno", None)
        where = f" at line {line}" if line else ""
        raise RecordError(
            path,
            f"the file is not valid JSON ({reason}{where}); expected a report.json "
            f"or a {RECORD_FILE}",
        ) from None
    if not isinstance(report, dict):
        raise RecordError(path, "expected a JSON object as written by GradWatch.report()")
    try:
        version = _int(report, "version")
        if version > SUPPORTED_REPORT_VERSION:
            raise _FieldError(
                f"report version {version} is newer than this reader's "
                f"{SUPPORTED_REPORT_VERSION}; upgrade keras_gradwatch to read it"
            )
        return RunRecord(
            path=path,
            format="report",
            version=version,
            model=None,
            layers=_layer_names(report),
            thresholds=_dict(report, "thresholds"),
            policies=_dict(report, "policies"),
            epochs=[_epoch_from_dict(entry) for entry in _list(report, "epochs")],
            findings=_sorted_findings(_finding_from_dict(d) for d in _list(report, "findings")),
            steps=_int(report, "steps"),
            complete=None,
        )
    except _FieldError as error:
        raise RecordError(path, str(error)) from None


def _layer_names(data: dict) -> list[str]:
    names = []
    for layer in _list(data, "layers"):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            raise _FieldError("each entry of 'layers' must be an object with a string 'name'")
        names.append(layer["name"])
    return names


def _epoch_from_dict(data) -> EpochStats:
    if not isinstance(data, dict):
        raise _FieldError("an epoch entry must be a JSON object")
    layers = {}
    for name, stats in _dict(data, "layers").items():
        if not isinstance(stats, dict):
            raise _FieldError(f"'layers.{name}' must be an object")
        layers[name] = {stat: _number(stats, stat) for stat in stats}
    epoch_time = data.get("time")
    return EpochStats(
        epoch=_int(data, "epoch"),
        steps=_int(data, "steps"),
        first_step=_int(data, "first_step"),
        last_step=_int(data, "last_step"),
        loss_mean=_number(data, "loss_mean"),
        global_grad_norm_median=_number(data, "global_grad_norm_median"),
        skipped_updates=_int(data, "skipped_updates"),
        layers=layers,
        time=None if epoch_time is None else _number(data, "time"),
    )


def _step_from_dict(data: dict) -> StepStats:
    skipped = data.get("update_skipped", False)
    if not isinstance(skipped, bool):
        raise _FieldError(f"'update_skipped' must be true or false, found {skipped!r}")
    return StepStats(
        step=_int(data, "step"),
        epoch=_int(data, "epoch"),
        loss=_number(data, "loss"),
        global_grad_norm=_number(data, "global_grad_norm"),
        update_skipped=skipped,
    )


def _finding_from_dict(data) -> F.Finding:
    if not isinstance(data, dict):
        raise _FieldError("a finding must be a JSON object")
    kind = _str(data, "kind")
    if kind not in F.KINDS:
        raise _FieldError(f"unknown finding kind {kind!r}")
    layers = _list(data, "layers")
    if not all(isinstance(layer, str) for layer in layers):
        raise _FieldError("'layers' must be a list of layer names")
    for name in ("step", "epoch"):
        _int(data, name)
    for name in ("value", "threshold"):
        _number(data, name)
    for name in ("message", "remedy", "detector"):
        _str(data, name)
    for name in ("count", "last_step"):
        if name in data:
            _int(data, name)
    if "last_value" in data:
        _number(data, "last_value")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise _FieldError("'extra' must be an object")
    return F.Finding.from_dict(data)


def _update_counts(found: dict, counts) -> None:
    if not isinstance(counts, dict):
        raise _FieldError("each entry of 'findings' must be an object")
    key = (_str(counts, "kind"), _str(counts, "detector"), tuple(_list(counts, "layers")))
    finding = found.get(key)
    if finding is None:
        # The finding line was lost; the epoch line alone lacks the message.
        return
    finding.count = _int(counts, "count")
    finding.last_step = _int(counts, "last_step")
    finding.last_value = _number(counts, "last_value")


def _sorted_findings(findings: Iterable[F.Finding]) -> list[F.Finding]:
    # The order of `GradWatch.findings`: most severe first, then first step.
    return sorted(findings, key=lambda f: (-f.severity, f.step, f.layers))


def _steps_seen(record: RunRecord) -> int:
    last = -1
    if record.epochs:
        last = max(last, record.epochs[-1].last_step)
    if record.step_stats:
        last = max(last, record.step_stats[-1].step)
    for finding in record.findings:
        last = max(last, finding.last_step)
    return last + 1


def _int(data: dict, name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(_expected(data, name, "an integer"))
    return value


def _number(data: dict, name: str) -> float:
    value = data.get(name)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldError(_expected(data, name, 'a number or "nan", "inf", "-inf"'))
    return float(value)


def _str(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise _FieldError(_expected(data, name, "a string"))
    return value


def _list(data: dict, name: str, required: bool = True) -> list:
    if not required and name not in data:
        return []
    value = data.get(name)
    if not isinstance(value, list):
        raise _FieldError(_expected(data, name, "a list"))
    return value


def _dict(data: dict, name: str) -> dict:
    value = data.get(name)
    if not isinstance(value, dict):
        raise _FieldError(_expected(data, name, "an object"))
    return value


def _expected(data: dict, name: str, what: str) -> str:
    if name not in data:
        return f"the field {name!r} is missing"
    return f"the field {name!r} must be {what}, found {data[name]!r}"
