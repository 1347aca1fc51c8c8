"""The gradwatch command line on records of real fits, and the CI recipe of docs/ci.md."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import build_mlp
from test_callback import diverging_regression

import keras_gradwatch as kg
from keras_gradwatch import GradWatch
from keras_gradwatch.cli import format_number, format_table, main
from keras_gradwatch.run_record import RECORD_FILE, load_run

REPO_ROOT = Path(__file__).resolve().parents[1]
CI_DOC = REPO_ROOT / "docs" / "ci.md"
SMOKE_SCRIPT = REPO_ROOT / "docs" / "examples" / "smoke_train.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Upper bound for one subprocess, far above its normal run time, so that a
# hung process fails the test instead of blocking the suite.
SUBPROCESS_TIMEOUT_S = 300


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["KERAS_BACKEND"] = "tensorflow"
    return env


def start_python(*args, cwd=REPO_ROOT):
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=subprocess_env(),
    )


def finish(process):
    """Wait for `process` and return its exit status and output."""
    try:
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_all(commands):
    """Run `python` processes side by side; `commands` maps a name to (arguments, cwd).

    A process that imports Keras spends seconds of CPU on it, so running the
    processes side by side keeps the suite short on a multi-core machine.
    """
    processes = {}
    try:
        for name, (args, cwd) in commands.items():
            processes[name] = start_python(*args, cwd=cwd)
        return {name: finish(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()


def gradwatch_args(*args):
    """Return the `python` arguments of `python -m keras_gradwatch ARGS`."""
    return ["-m", "keras_gradwatch", *args]


def run_gradwatch(*args):
    """Run `python -m keras_gradwatch ARGS` in a new process."""
    return finish(start_python(*gradwatch_args(*args)))


def fit_with_log_dir(log_dir, model, x, y, watch_kwargs=None, **fit_kwargs):
    watch = GradWatch(log_dir=log_dir, verbose=0, **(watch_kwargs or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        model.fit(x, y, callbacks=[watch], verbose=0, **fit_kwargs)
    return watch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records of three real fits: healthy, exploding and NaN, by name."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.3]])).astype("float32")
    healthy = fit_with_log_dir(
        root / "healthy", build_mlp(hidden=(16,)), x, y, batch_size=32, epochs=2
    )

    model, x_big, y_big = diverging_regression()
    exploding = fit_with_log_dir(
        root / "exploding",
        model,
        x_big,
        y_big,
        {"update_freq": "batch", "on_exploding": "stop"},
        batch_size=16,
        epochs=2,
    )

    y_nan = y.copy()
    y_nan[5 * 8 + 3, 0] = np.nan
    nan = fit_with_log_dir(
        root / "nan",
        build_mlp(hidden=(16,)),
        x,
        y_nan,
        {"update_freq": "batch", "on_nonfinite": "stop"},
        batch_size=8,
        epochs=1,
        shuffle=False,
    )

    assert healthy.findings == []
    assert {f.kind for f in exploding.findings} == {"exploding_gradient"}
    assert [f.kind for f in nan.findings] == ["nonfinite"]
    return {
        "healthy": (root / "healthy", healthy),
        "exploding": (root / "exploding", exploding),
        "nan": (root / "nan", nan),
    }


@pytest.fixture(scope="module")
def checks(runs, tmp_path_factory):
    """Results of `python -m keras_gradwatch check` on each kind of record, by name."""
    root = tmp_path_factory.mktemp("checks")
    lines = (runs["exploding"][0] / RECORD_FILE).read_text(encoding="utf-8").splitlines(True)
    lines[1] = "this is not JSON\n"
    corrupt = root / RECORD_FILE
    corrupt.write_text("".join(lines), encoding="utf-8")
    paths = {
        "healthy": runs["healthy"][0],
        "exploding": runs["exploding"][0],
        "nan": runs["nan"][0] / RECORD_FILE,
        "corrupt": corrupt,
        "missing": root / "no-such-log-dir",
    }
    results = run_all(
        {name: (gradwatch_args("check", path), REPO_ROOT) for name, path in paths.items()}
    )
    return {name: (paths[name], result) for name, result in results.items()}


def table_row(output, kind, step):
    """Return the findings-table line of `kind` first detected at `step`."""
    for line in output.splitlines():
        cells = line.split()
        if cells[:2] == [kind, str(step)]:
            return line
    raise AssertionError(f"no table row for {kind} at step {step} in:\n{output}")


def test_check_healthy_run_passes(checks):
    _, result = checks["healthy"]

    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
    assert "OK: no finding of a kind in --fail-on (nonfinite, exploding_gradient)" in result.stdout
    assert "complete" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_exploding_run_fails(checks, runs):
    _, watch = runs["exploding"]
    _, result = checks["exploding"]

    assert result.returncode == 1, result.stderr
    finding = watch.findings[0]
    row = table_row(result.stdout, "exploding_gradient", finding.step)
    assert row.endswith(", ".join(finding.layers))
    assert " yes " in row
    assert f"- {finding.describe()}" in result.stdout
    assert f"FAILED: {len(watch.findings)} finding(s) of a kind in --fail-on" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_nan_run_fails(checks, runs):
    _, watch = runs["nan"]
    _, result = checks["nan"]

    assert result.returncode == 1, result.stderr
    (finding,) = watch.findings
    assert finding.step == 5
    row = table_row(result.stdout, "nonfinite", 5)
    assert row.endswith("out")
    assert "nan" in finding.message
    assert f"- {finding.describe()}" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_corrupt_record_exits_2(checks):
    path, result = checks["corrupt"]

    assert result.returncode == 2
    assert f"check: error: {path}: line 2 is not valid JSON" in result.stderr
    assert result.stderr.count("error:") == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_check_missing_path_exits_2(checks):
    path, result = checks["missing"]

    assert result.returncode == 2
    assert f"check: error: {path}: not found" in result.stderr
    assert result.stderr.count("error:") == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "run, fail_on, status",
    [
        ("exploding", "nonfinite", 0),
        ("exploding", "exploding_gradient", 1),
        ("exploding", "any", 1),
        ("nan", "exploding", 0),
        ("nan", "vanishing,loss", 0),
        ("nan", "nonfinite", 1),
        ("nan", "none", 0),
        ("healthy", "any", 0),
    ],
)
def test_check_fail_on_selects_kinds(runs, capsys, run, fail_on, status):
    log_dir, _ = runs[run]
    assert main(["check", str(log_dir), "--fail-on", fail_on]) == status
    output = capsys.readouterr().out
    assert ("FAILED" in output) == (status == 1)


def test_check_rejects_unknown_kind(runs, capsys):
    log_dir, _ = runs["healthy"]
    assert main(["check", str(log_dir), "--fail-on", "exploding,melting"]) == 2
    error = capsys.readouterr().err
    assert "argument --fail-on" in error
    assert "'melting'" in error


def test_check_json_lists_every_record(runs, capsys, tmp_path):
    missing = tmp_path / "missing"
    paths = [runs["healthy"][0], runs["nan"][0], missing]
    assert main(["check", *map(str, paths), "--json"]) == 2

    output = json.loads(capsys.readouterr().out)
    assert output["status"] == 2
    assert output["fail_on"] == ["nonfinite", "exploding_gradient"]
    healthy, nan = output["records"]
    assert healthy["findings"] == []
    assert healthy["complete"] is True
    assert healthy["epochs_completed"] == 2
    (finding,) = nan["findings"]
    assert finding["kind"] == "nonfinite"
    assert finding["fails"] is True
    assert finding["step"] == 5
    assert output["errors"] == [{"path": str(missing), "reason": "not found"}]


def test_report_prints_layer_statistics(runs, capsys):
    log_dir, watch = runs["exploding"]
    assert main(["report", str(log_dir / "report.json")]) == 0
    output = capsys.readouterr().out

    report = watch.report()
    first = report["epochs"][0]["layers"]
    last = report["epochs"][-1]["layers"]
    for layer in ("hidden_0", "out"):
        expected = [
            format_number(float(first[layer]["grad_norm_median"])),
            format_number(float(last[layer]["grad_norm_median"])),
        ]
        rows = [line.split() for line in output.splitlines() if line.startswith(layer)]
        assert len(rows) == 3, output
        assert rows[0][2:4] == expected
    assert "Gradient L2 norm, median of each epoch" in output
    assert "Weight L2 norm at the end of each epoch" in output
    assert "Update ratio ||delta w|| / ||w||, median of each epoch" in output
    assert "exploding_gradient" in output


def test_plot_writes_png(runs, tmp_path, capsys):
    log_dir, _ = runs["exploding"]
    output = tmp_path / "flow.png"
    assert main(["plot", str(log_dir), "-o", str(output)]) == 0
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    assert f"wrote {output}" in capsys.readouterr().out


def test_plot_without_matplotlib_explains(runs, tmp_path, capsys, monkeypatch):
    log_dir, _ = runs["healthy"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(log_dir), "-o", str(tmp_path / "flow.png")]) == 2
    assert "needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "flow.png").exists()


def test_help_says_what_options_set(capsys):
    assert main(["check", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--fail-on KINDS" in text
    assert "(default: exploding,nonfinite)" in text
    assert "--json" in text
    assert main(["plot", "--help"]) == 0
    assert "PNG file to write" in capsys.readouterr().out
    assert main([]) == 2
    assert "required" in capsys.readouterr().err


def test_format_table_aligns_columns():
    table = format_table(["name", "value"], [["a", "1"], ["long name", "1e+04"]])
    assert table.splitlines() == [
        "name       value",
        "---------  -----",
        "a              1",
        "long name  1e+04",
    ]


TRAIN_UNTIL_KILLED = textwrap.dedent(
    """
    import sys

    import keras
    import numpy as np

    from keras_gradwatch import GradWatch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    watch = GradWatch(log_dir=sys.argv[1], update_freq="batch", verbose=0)
    model.fit(x, y, batch_size=8, epochs=100_000, callbacks=[watch], verbose=0)
    """
)


def count_epoch_lines(path):
    if not path.exists():
        return 0
    return path.read_bytes().count(b'{"type":"epoch"')


def test_check_record_of_killed_training(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_UNTIL_KILLED, encoding="utf-8")
    log_dir = tmp_path / "logs"
    record_path = log_dir / RECORD_FILE
    # A file never fills up, while an unread pipe does and then blocks the training.
    stderr_path = tmp_path / "train.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script), str(log_dir)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=subprocess_env(),
        )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while count_epoch_lines(record_path) < 2:
            assert process.poll() is None, stderr_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "training wrote no 2 epoch lines in time"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL on POSIX, so no Python cleanup runs
        process.wait()
    assert process.returncode != 0

    record = load_run(log_dir)
    assert record.complete is False
    assert len(record.epochs) >= 2
    assert record.steps >= 2 * 32
    failing = record.findings_of("exploding,nonfinite")
    result = run_gradwatch("check", log_dir)
    assert result.returncode == (1 if failing else 0), result.stdout
    assert "incomplete" in result.stdout
    assert "note: the record has no run_end line" in result.stdout
    assert "Traceback" not in result.stderr


# The commands of the GitHub Actions job in docs/ci.md, each run below as written.
CI_TRAIN = "python docs/examples/smoke_train.py --log-dir gradwatch-logs"
CI_CHECK = "gradwatch check gradwatch-logs"
CI_PYTEST = "pytest -W error::keras_gradwatch.ExplodingGradientWarning docs/examples/smoke_train.py"


def as_python_command(command):
    """Run `python ...`, `gradwatch ...` and `pytest ...` with this interpreter."""
    program, *args = command.split()
    prefix = {
        "python": [],
        "gradwatch": ["-m", "keras_gradwatch"],
        "pytest": ["-m", "pytest", "-p", "no:cacheprovider"],
    }[program]
    return prefix + args


def test_ci_doc_commands_pass_on_smoke_model(tmp_path):
    doc = CI_DOC.read_text(encoding="utf-8")
    for command in (CI_TRAIN, CI_CHECK, CI_PYTEST):
        assert f"run: {command}" in doc

    workdir = tmp_path / "checkout"
    (workdir / "docs" / "examples").mkdir(parents=True)
    (workdir / "docs" / "examples" / "smoke_train.py").write_bytes(SMOKE_SCRIPT.read_bytes())
    # Steps (a) and (c) do not depend on each other; (b) reads what (a) wrote.
    first = run_all(
        {
            "train": (as_python_command(CI_TRAIN), workdir),
            "pytest": (as_python_command(CI_PYTEST), workdir),
        }
    )
    check = finish(start_python(*as_python_command(CI_CHECK), cwd=workdir))

    train, tests = first["train"], first["pytest"]
    assert train.returncode == 0, train.stderr
    assert "smoke training passed" in train.stdout
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK: no finding" in check.stdout
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout


def load_smoke_module():
    spec = importlib.util.spec_from_file_location("smoke_train", SMOKE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_script_fails_on_explosion(tmp_path, capsys):
    smoke = load_smoke_module()
    log_dir = tmp_path / "gradwatch-logs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        status = smoke.main(["--log-dir", str(log_dir), "--learning-rate", "1.0"])
    assert status == 1
    assert "smoke training failed: exploding_gradient at step" in capsys.readouterr().err
    assert main(["check", str(log_dir)]) == 1


def test_smoke_training_fails_under_warning_filter(tmp_path):
    # What `pytest -W error::keras_gradwatch.ExplodingGradientWarning` does to
    # `test_smoke_training` when the model explodes.
    smoke = load_smoke_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kg.ExplodingGradientWarning)
        warnings.simplefilter("ignore", kg.NonFiniteWarning)
        with pytest.raises(kg.ExplodingGradientWarning):
            smoke.train(log_dir=tmp_path, learning_rate=1.0)


def test_check_text_counts_unreadable_records(runs, capsys, tmp_path):
    missing = tmp_path / "missing"
    assert main(["check", str(runs["healthy"][0]), str(missing)]) == 2

    captured = capsys.readouterr()
    assert f"check: error: {missing}: not found" in captured.err
    assert "ERROR: 1 of 2 record(s) could not be read" in captured.out
