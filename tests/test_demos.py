"""Tests of the demos: data preparation, command line, outputs and diagnoses.

The tests read the credit-card data from `GRADWATCH_DATA`, else from
`shared/data/credit_card` next to the repository directory, and fail if neither
exists.
The training runs use a few epochs, enough for the early diagnoses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from demos.cli import main
from demos.data import (
    CATEGORICAL_COLUMNS,
    DATA_ENV_VAR,
    FEATURE_COLUMNS,
    FEATURES_FILE,
    LABELS_FILE,
    DataError,
    prepare,
)
from demos.plots import plot_gradient_flow
from demos.summary import compare_with_tutorial, describe_findings
from keras_gradwatch import GradientWarning

REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "credit_card"
DATASET_URL = "kaggle.com/datasets/rohitudageri/credit-card-details"
TEST_EPOCHS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    configured = os.environ.get(DATA_ENV_VAR)
    path = Path(configured) if configured else FALLBACK_DATA_DIR
    if not (path / FEATURES_FILE).is_file() or not (path / LABELS_FILE).is_file():
        pytest.fail(
            f"Credit-card data not found in {path}. Set {DATA_ENV_VAR} to the directory "
            f"containing {FEATURES_FILE} and {LABELS_FILE}."
        )
    return path


@pytest.fixture(scope="module")
def prepared(data_dir):
    return prepare(data_dir, seed=0)


@pytest.fixture(scope="module")
def demo_run(data_dir, tmp_path_factory):
    """Run all four models for a few epochs through the command-line entry function."""
    output_dir = tmp_path_factory.mktemp("demo-output")
    arguments = [
        "--data",
        str(data_dir),
        "--epochs",
        str(TEST_EPOCHS),
        "--out",
        str(output_dir),
        "--quiet",
    ]
    # The findings are checked in report.json, so their warnings are only noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        status = main(arguments)
    return status, output_dir


def _findings(output_dir: Path, model: int) -> list[dict]:
    report = json.loads((output_dir / f"model_{model}" / "report.json").read_text())
    return report["findings"]


# Data preparation


def test_prepare_row_counts(prepared):
    assert prepared.balanced_rows == 2746
    assert len(prepared.x_train) == 2059
    assert len(prepared.x_val) == 687
    assert len(prepared.y_train) == 2059
    assert len(prepared.y_val) == 687


def test_prepare_balanced_classes(prepared):
    labels = np.concatenate([prepared.y_train, prepared.y_val])
    assert np.bincount(labels).tolist() == [1373, 1373]


def test_prepare_feature_columns(prepared):
    assert list(prepared.x_train.columns) == list(FEATURE_COLUMNS)
    assert len(FEATURE_COLUMNS) == 18
    assert prepared.x_train_scaled.shape == (2059, 18)
    assert prepared.x_val_scaled.shape == (687, 18)


def test_prepare_no_missing_values(prepared):
    assert not prepared.x_train.isna().any().any()
    assert not prepared.x_val.isna().any().any()
    assert np.isfinite(prepared.x_train_scaled).all()
    assert np.isfinite(prepared.x_val_scaled).all()


def test_prepare_category_codes(prepared):
    for column in CATEGORICAL_COLUMNS:
        assert pd.api.types.is_integer_dtype(prepared.x_train[column]), column
        assert prepared.x_train[column].min() >= 0, column


def test_prepare_scaled_on_training_split(prepared):
    # `Mobile_phone` is 1 for every applicant, so StandardScaler maps it to 0.
    varying = prepared.x_train.std().to_numpy() > 0
    assert varying.sum() == 17
    means = prepared.x_train_scaled.mean(axis=0)
    stds = prepared.x_train_scaled.std(axis=0)
    np.testing.assert_allclose(means, 0.0, atol=1e-5)
    np.testing.assert_allclose(stds[varying], 1.0, atol=1e-4)


def test_prepare_raw_features_unscaled(prepared):
    raw_train, _ = prepared.features(scaled=False)
    income = raw_train[:, FEATURE_COLUMNS.index("Annual_income")]
    assert raw_train.dtype == np.float32
    assert income.mean() > 10_000


def test_prepare_seed_changes_split(data_dir, prepared):
    other = prepare(data_dir, seed=1)
    assert len(other.x_train) == 2059
    assert not np.array_equal(other.y_train, prepared.y_train)


# Data errors


def test_prepare_missing_directory(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(DataError, match="not found") as raised:
        prepare(missing)
    assert str(missing) in str(raised.value)
    assert DATASET_URL in str(raised.value)


def test_prepare_missing_file(tmp_path, data_dir):
    (tmp_path / FEATURES_FILE).write_bytes((data_dir / FEATURES_FILE).read_bytes())
    with pytest.raises(DataError) as raised:
        prepare(tmp_path)
    message = str(raised.value)
    assert LABELS_FILE in message
    assert DATASET_URL in message
    assert "--data DIR" in message
    assert DATA_ENV_VAR in message


def test_prepare_missing_column(tmp_path, data_dir):
    features = pd.read_csv(data_dir / FEATURES_FILE).drop(columns=["Annual_income"])
    features.to_csv(tmp_path / FEATURES_FILE, index=False)
    (tmp_path / LABELS_FILE).write_bytes((data_dir / LABELS_FILE).read_bytes())
    with pytest.raises(DataError, match="Annual_income") as raised:
        prepare(tmp_path)
    assert FEATURES_FILE in str(raised.value)


def test_cli_missing_directory_subprocess(tmp_path):
    missing = tmp_path / "absent"
    completed = subprocess.run(
        [sys.executable, "-m", "demos", "--data", str(missing), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert str(missing) in completed.stderr
    assert DATASET_URL in completed.stderr
    assert DATA_ENV_VAR in completed.stderr
    assert not (tmp_path / "out").exists()


def test_cli_no_data_directory(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    status = main(["--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2
    assert "No data directory given" in captured.err
    assert DATA_ENV_VAR in captured.err


def test_cli_data_from_environment(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "from-env"
    monkeypatch.setenv(DATA_ENV_VAR, str(missing))
    status = main(["--out", str(tmp_path / "out")])
    assert status == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_output_directory_is_file(data_dir, capsys, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("")
    status = main(["--data", str(data_dir), "--out", str(occupied)])
    captured = capsys.readouterr()
    assert status == 2
    assert str(occupied) in captured.err
    assert "--out DIR" in captured.err


@pytest.mark.parametrize("arguments", [["5"], ["--epochs", "0"], ["--epochs", "many"]])
def test_cli_invalid_arguments(arguments, capsys):
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    assert raised.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# Training runs


def test_run_exit_status(demo_run):
    status, _ = demo_run
    assert status == 0


@pytest.mark.parametrize("model", [1, 2, 3, 4])
def test_run_writes_model_files(demo_run, model):
    _, output_dir = demo_run
    model_dir = output_dir / f"model_{model}"

    report = json.loads((model_dir / "report.json").read_text())
    assert isinstance(report["findings"], list)

    figure = model_dir / "gradient_flow.png"
    assert figure.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE

    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert 1 <= metrics["epochs_run"] <= TEST_EPOCHS
    assert 0.0 <= metrics["val_accuracy"] <= 1.0


@pytest.mark.parametrize("model", [1, 2, 3, 4])
def test_run_writes_tensorboard_events(demo_run, model):
    _, output_dir = demo_run
    log_dir = output_dir / f"model_{model}" / "train"
    event_files = list(log_dir.rglob("events.out.tfevents.*"))
    assert event_files, f"no TensorBoard event files under {log_dir}"


def test_run_writes_summary(demo_run):
    _, output_dir = demo_run
    summary = json.loads((output_dir / "summary.json").read_text())
    assert [result["model"] for result in summary["results"]] == [1, 2, 3, 4]
    assert summary["seed"] == 0
    table = (output_dir / "summary.md").read_text()
    assert table.count("\n") == 6


def test_run_classification_reports(demo_run):
    _, output_dir = demo_run
    for model in (2, 4):
        metrics = json.loads((output_dir / f"model_{model}" / "metrics.json").read_text())
        assert "precision" in metrics["classification_report"]
    for model in (1, 3):
        metrics = json.loads((output_dir / f"model_{model}" / "metrics.json").read_text())
        assert metrics["classification_report"] is None


def test_model_1_dead_first_layer(demo_run):
    _, output_dir = demo_run
    dead = [finding for finding in _findings(output_dir, 1) if finding["kind"] == "dead_layer"]
    assert dead, "model 1 has no dead_layer finding"
    assert any("dense_1" in finding["layers"] for finding in dead)


def test_model_1_vanishing_gradient(demo_run):
    _, output_dir = demo_run
    kinds = {finding["kind"] for finding in _findings(output_dir, 1)}
    assert "vanishing_gradient" in kinds


def test_model_2_no_gradient_problem(demo_run):
    _, output_dir = demo_run
    kinds = {finding["kind"] for finding in _findings(output_dir, 2)}
    problems = kinds & {"vanishing_gradient", "exploding_gradient", "dead_layer", "nonfinite"}
    assert not problems


# Summary and figure, on scripted findings and statistics


def _finding(kind: str, step: int, layers: tuple[str, ...] = ()) -> dict:
    return {"kind": kind, "step": step, "layers": list(layers)}


def test_describe_findings_groups_kinds():
    findings = [
        _finding("dead_layer", 0, ("dense_1",)),
        _finding("vanishing_gradient", 4, ("dense_2", "output")),
        _finding("vanishing_gradient", 2, ("dense_3", "output")),
    ]
    lines = describe_findings(findings).splitlines()
    assert lines == [
        "dead_layer (step 0; dense_1)",
        "vanishing_gradient (step 2; dense_2, output, dense_3)",
    ]


def test_describe_findings_empty():
    assert describe_findings([]) == "no findings"


def test_compare_exploding_without_finding():
    findings = [_finding("dead_layer", 0, ("dense_1",)), _finding("loss_oscillation", 70)]
    text = compare_with_tutorial("exploding", findings)
    assert text.startswith("no exploding-gradient finding")
    assert "dead layer: dense_1" in text
    assert "its loss oscillates" in text


def test_compare_exploding_with_finding():
    findings = [_finding("exploding_gradient", 3, ("dense_1",))]
    assert compare_with_tutorial("exploding", findings).startswith("agrees")


def test_compare_fixed_model_with_problem():
    findings = [_finding("nonfinite", 9), _finding("loss_stagnation", 1)]
    text = compare_with_tutorial(None, findings)
    assert text.startswith("differs")
    assert "nonfinite" in text
    assert "loss_stagnation" not in text


def test_plot_zero_and_nonfinite_norms(tmp_path):
    frame = pd.DataFrame(
        {
            "epoch": [0, 0, 0, 1, 1, 1],
            "layer": ["dense_1", "dense_2", "output"] * 2,
            "depth": [0, 1, 2] * 2,
            "grad_norm_median": [0.0, 1e-4, 0.1, 0.0, float("nan"), float("inf")],
        }
    )
    path = plot_gradient_flow(frame, tmp_path / "flow.png", title="scripted")
    assert path.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE
