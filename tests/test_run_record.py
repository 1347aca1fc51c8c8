"""Run record: the gradwatch.jsonl and report.json written during real fits, and load_run."""

import json
import shutil
import warnings

import keras
import numpy as np
import pytest
from conftest import build_mlp
from test_callback import diverging_regression

import keras_gradwatch as kg
from keras_gradwatch import GradWatch, Thresholds, run_record
from keras_gradwatch.run_record import (
    RECORD_FILE,
    REPORT_FILE,
    RUN_END_OMITS,
    RecordError,
    load_run,
    select_kinds,
)


def reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def read_lines(log_dir):
    """Parse gradwatch.jsonl as strict JSON: NaN and Infinity tokens are rejected."""
    text = (log_dir / RECORD_FILE).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=reject_constant) for line in text.splitlines()]


def read_report(log_dir):
    text = (log_dir / REPORT_FILE).read_text(encoding="utf-8")
    return json.loads(text, parse_constant=reject_constant)


def in_json(value):
    return json.loads(json.dumps(value))


class RecordProbe(keras.callbacks.Callback):
    """Reads the files when training begins and at each epoch end.

    It must come after GradWatch in the callback list, so GradWatch's hooks run first.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self.epoch_lines = []
        self.report_epochs = []

    def on_train_begin(self, logs=None):
        self.report_epochs.append(read_report(self.log_dir)["epochs_completed"])

    def on_epoch_end(self, epoch, logs=None):
        lines = read_lines(self.log_dir)
        self.epoch_lines.append(sum(line["type"] == "epoch" for line in lines))
        self.report_epochs.append(read_report(self.log_dir)["epochs_completed"])


@pytest.fixture(scope="module")
def exploding_run(tmp_path_factory):
    """A diverging regression: exploding gradients from step 1, then NaN."""
    log_dir = tmp_path_factory.mktemp("exploding")
    model, x, y = diverging_regression()
    watch = GradWatch(log_dir=log_dir, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)
    kinds = {finding.kind for finding in watch.findings}
    assert {"exploding_gradient", "nonfinite"} <= kinds
    return log_dir, watch


def test_record_follows_training(tmp_path, regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, update_freq="batch", verbose=0)
    probe = RecordProbe(tmp_path)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch, probe], verbose=0)

    lines = read_lines(tmp_path)
    types = [line["type"] for line in lines]
    assert types[0] == "run_start"
    assert types[-1] == "run_end"
    assert types.count("epoch") == 3
    assert types.count("step") == 12
    start = lines[0]
    assert start["version"] == 1
    assert start["model"] == "mlp"
    assert start["update_freq"] == "batch"
    assert [layer["name"] for layer in start["layers"]] == ["hidden_0", "out"]
    assert start["thresholds"] == in_json(vars(Thresholds()))
    assert start["policies"] == {
        "vanishing": "warn",
        "exploding": "warn",
        "nonfinite": "warn",
        "loss": "warn",
    }
    steps = [line for line in lines if line["type"] == "step"]
    assert [line["step"] for line in steps] == list(range(12))
    assert set(steps[0]) == {"type", "step", "epoch", "loss", "global_grad_norm", "update_skipped"}
    epochs = [line for line in lines if line["type"] == "epoch"]
    assert [line["epoch"] for line in epochs] == [0, 1, 2]
    assert set(epochs[0]["layers"]["out"]) >= {
        "grad_norm_min",
        "grad_norm_median",
        "grad_norm_max",
        "grad_norm_last",
        "weight_norm_last",
        "update_ratio_median",
    }
    end = lines[-1]
    assert end["steps"] == 12
    assert end["stop_training"] is False
    report_totals = set(watch.report()) - set(RUN_END_OMITS)
    assert set(end) == {"type", "time", "stop_training"} | report_totals

    # Each epoch's line is on disk when the next callback runs. report.json is
    # replaced at the first epoch end, then at most every REPORT_INTERVAL
    # seconds, which this short run never reaches.
    assert probe.epoch_lines == [1, 2, 3]
    assert probe.report_epochs == [0, 1, 1, 1]
    # The final report.json is the in-process report, after a JSON round trip.
    assert read_report(tmp_path) == in_json(watch.report())
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_replaced_after_interval(tmp_path, regression_data, monkeypatch):
    monkeypatch.setattr(run_record, "REPORT_INTERVAL", 0.0)
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    probe = RecordProbe(tmp_path)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch, probe], verbose=0)

    assert probe.report_epochs == [0, 1, 2, 3]


def test_int_update_freq_samples_steps(tmp_path, regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, update_freq=3, verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch], verbose=0)

    steps = [line["step"] for line in read_lines(tmp_path) if line["type"] == "step"]
    assert steps == [0, 3, 6, 9]


def test_nonfinite_values_written_as_strings(tmp_path, regression_data):
    x, y = regression_data
    y = y.copy()
    y[5 * 8 + 3, 0] = np.nan
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)

    lines = read_lines(tmp_path)
    assert "step" not in {line["type"] for line in lines}
    first = next(line for line in lines if line["type"] == "finding")
    assert first["kind"] == "nonfinite"
    assert first["step"] == 5
    assert first["layers"] == ["out"]
    assert "nan" in first["message"]
    (epoch_line,) = [line for line in lines if line["type"] == "epoch"]
    assert epoch_line["layers"]["out"]["weight_norm_last"] == "nan"
    read_report(tmp_path)

    record = load_run(tmp_path)
    assert np.isnan(record.epochs[0].value("out", "weight_norm_last"))
    assert [f.to_dict() for f in record.findings] == [f.to_dict() for f in watch.findings]


@pytest.mark.parametrize("target", ["dir", RECORD_FILE, REPORT_FILE])
def test_load_run_matches_watch(exploding_run, target):
    log_dir, watch = exploding_run
    path = log_dir if target == "dir" else log_dir / target
    record = load_run(path)

    expected_format = "report" if target == REPORT_FILE else "jsonl"
    assert record.format == expected_format
    assert record.complete is (None if target == REPORT_FILE else True)
    assert record.layers == ["hidden_0", "out"]
    assert record.steps == 32
    assert all(isinstance(finding, kg.Finding) for finding in record.findings)
    assert [f.to_dict() for f in record.findings] == in_json([f.to_dict() for f in watch.findings])
    report = watch.report()
    assert [epoch.epoch for epoch in record.epochs] == [0, 1]
    for stats, expected in zip(record.epochs, report["epochs"]):
        assert stats.steps == expected["steps"]
        assert stats.last_step == expected["last_step"]
        for layer in record.layers:
            for stat, value in expected["layers"][layer].items():
                assert stats.value(layer, stat) == pytest.approx(float(value), nan_ok=True)
    assert record.notes == []


def test_truncated_last_line_ignored(exploding_run, tmp_path):
    log_dir, watch = exploding_run
    lines = (log_dir / RECORD_FILE).read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "run_end"
    # Cut inside the run_end line, as a crash while writing it would.
    (tmp_path / RECORD_FILE).write_bytes(b"".join(lines[:-1]) + lines[-1][:40])

    record = load_run(tmp_path)
    assert record.complete is False
    assert any(f"line {len(lines)} is incomplete" in note for note in record.notes)
    assert any("no run_end line" in note for note in record.notes)
    assert len(record.epochs) == 2
    assert record.steps == 32
    # Without run_end, the counts come from the last epoch line.
    assert [f.to_dict() for f in record.findings] == in_json([f.to_dict() for f in watch.findings])


def test_record_cut_mid_epoch_reads_to_last_epoch(exploding_run, tmp_path):
    log_dir, _ = exploding_run
    text = (log_dir / RECORD_FILE).read_text(encoding="utf-8")
    last_epoch_line = text.rindex('{"type":"epoch"')
    (tmp_path / RECORD_FILE).write_text(text[: last_epoch_line + 100], encoding="utf-8")

    record = load_run(tmp_path / RECORD_FILE)
    assert record.complete is False
    assert [epoch.epoch for epoch in record.epochs] == [0]
    assert {f.kind for f in record.findings} == {"exploding_gradient", "nonfinite"}


def test_corrupt_line_raises_record_error(exploding_run, tmp_path):
    log_dir, _ = exploding_run
    lines = (log_dir / RECORD_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = '{"type": "finding", "kind": \n'
    path = tmp_path / RECORD_FILE
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(RecordError) as raised:
        load_run(path)
    assert isinstance(raised.value, ValueError)
    assert raised.value.path == str(path)
    assert str(path) in str(raised.value)
    assert "line 3 is not valid JSON" in str(raised.value)


RUN_START = {
    "type": "run_start",
    "version": 1,
    "model": "m",
    "layers": [{"name": "dense", "depth": 0, "variables": []}],
    "thresholds": {},
    "policies": {},
}
EPOCH = {
    "type": "epoch",
    "epoch": 0,
    "steps": 2,
    "first_step": 0,
    "last_step": 1,
    "loss_mean": 0.5,
    "global_grad_norm_median": 1.0,
    "skipped_updates": 0,
    "layers": {"dense": {"grad_norm_median": 1.0}},
}


def jsonl(*objects):
    return "".join(json.dumps(obj) + "\n" for obj in objects)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        (RECORD_FILE, "", "the file is empty"),
        (RECORD_FILE, '{"type": "run_st', "contains no complete line"),
        (RECORD_FILE, jsonl(EPOCH), "expected a run_start line first, found 'epoch'"),
        (RECORD_FILE, jsonl({**RUN_START, "version": 2}), "version 2 is newer"),
        (RECORD_FILE, jsonl(RUN_START, RUN_START), "a second run_start line"),
        (RECORD_FILE, jsonl(RUN_START, [1, 2]), "line 2 is not a JSON object"),
        (
            RECORD_FILE,
            jsonl(RUN_START, {k: v for k, v in EPOCH.items() if k != "steps"}),
            "line 2 (epoch): the field 'steps' is missing",
        ),
        (
            RECORD_FILE,
            jsonl(RUN_START, {**EPOCH, "loss_mean": "high"}),
            "the field 'loss_mean' must be a number",
        ),
        (
            RECORD_FILE,
            jsonl(RUN_START, {"type": "finding", "kind": "melting", "layers": []}),
            "unknown finding kind 'melting'",
        ),
        (REPORT_FILE, "[1, 2]", "expected a JSON object"),
        (REPORT_FILE, '{"version": 1, ', "not valid JSON"),
        (REPORT_FILE, '{"version": "1"}', "the field 'version' must be an integer"),
        ("record.bin", "\udcff", "not UTF-8"),
    ],
)
def test_invalid_record_rejected(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(RecordError) as raised:
        load_run(path)
    assert reason in raised.value.reason
    assert str(raised.value).startswith(f"{path}: ")


def test_missing_paths_rejected(tmp_path):
    with pytest.raises(RecordError, match="not found"):
        load_run(tmp_path / "no-such-dir")
    with pytest.raises(RecordError, match="neither gradwatch.jsonl nor report.json"):
        load_run(tmp_path)


def test_unknown_line_type_noted(tmp_path):
    (tmp_path / RECORD_FILE).write_text(jsonl(RUN_START, {"type": "comment"}, EPOCH))
    record = load_run(tmp_path)
    assert record.notes[0] == "line 2: unknown line type 'comment' ignored"
    assert len(record.epochs) == 1
    assert record.steps == 2


class InterruptAt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after a given batch, as Ctrl-C during `fit` does."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt


def test_interrupted_fit_leaves_readable_record(tmp_path, regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, update_freq="batch", verbose=0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch, InterruptAt(1, 1)], verbose=0)

    record = load_run(tmp_path)
    assert record.complete is False
    assert [epoch.epoch for epoch in record.epochs] == [0]
    assert [stats.step for stats in record.step_stats] == [0, 1, 2, 3, 4, 5]
    assert record.steps == 6
    assert read_report(tmp_path)["epochs_completed"] == 1


def test_raise_policy_closes_record(tmp_path):
    model, x, y = diverging_regression()
    watch = GradWatch(log_dir=tmp_path, update_freq="batch", on_exploding="raise", verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        with pytest.raises(kg.ExplodingGradientError) as raised:
            model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch], verbose=0)

    finding = raised.value.finding
    assert finding.kind == "exploding_gradient"
    record = load_run(tmp_path)
    assert record.complete is True
    assert record.policies["exploding"] == "raise"
    assert finding.to_dict() in [f.to_dict() for f in record.findings]
    end = read_lines(tmp_path)[-1]
    assert end["type"] == "run_end"
    assert end["stop_training"] is True
    assert read_report(tmp_path) == in_json(watch.report())


def test_raise_at_epoch_end_keeps_epoch(tmp_path, regression_data):
    # The small-update check runs on each epoch's summary. Every layer fails it
    # with this threshold, so the "raise" policy ends fit at the first epoch end.
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(
        log_dir=tmp_path,
        on_vanishing="raise",
        thresholds=Thresholds(min_update_ratio=0.5),
        verbose=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        with pytest.raises(kg.VanishingGradientError) as raised:
            model.fit(x, y, batch_size=16, epochs=3, callbacks=[watch], verbose=0)

    assert raised.value.finding.kind == "small_update"
    record = load_run(tmp_path)
    assert record.complete is True
    assert [epoch.epoch for epoch in record.epochs] == [0]
    assert read_report(tmp_path)["epochs_completed"] == 1
    types = [line["type"] for line in read_lines(tmp_path)]
    assert types[-2:] == ["epoch", "run_end"]


def test_second_fit_starts_record_anew(tmp_path, regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(log_dir=tmp_path, verbose=0)
    model.fit(x, y, batch_size=32, epochs=3, callbacks=[watch], verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[watch], verbose=0)

    types = [line["type"] for line in read_lines(tmp_path)]
    assert types == ["run_start", "epoch", "run_end"]
    assert load_run(tmp_path).steps == 2
    assert read_report(tmp_path)["epochs_completed"] == 1


def test_select_kinds_names_and_groups():
    assert select_kinds("exploding,nonfinite") == {"exploding_gradient", "nonfinite"}
    assert select_kinds(["vanishing"]) == {"vanishing_gradient", "dead_layer", "small_update"}
    assert select_kinds(["loss_stagnation"]) == {"loss_stagnation"}
    assert select_kinds("any") == set(kg.findings.KINDS)
    assert select_kinds("none") == set()
    assert select_kinds(()) == set()
    with pytest.raises(ValueError, match="'explode'"):
        select_kinds("explode")


def test_load_run_copies_of_log_dir(exploding_run, tmp_path):
    # A log_dir holding only report.json, as after copying just that file.
    log_dir, watch = exploding_run
    shutil.copy(log_dir / REPORT_FILE, tmp_path / REPORT_FILE)
    record = load_run(tmp_path)
    assert record.format == "report"
    assert len(record.findings) == len(watch.findings)
