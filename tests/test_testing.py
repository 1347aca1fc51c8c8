"""keras_gradwatch.testing: assert_healthy_training and the gradwatch pytest fixture."""

import textwrap
import warnings

import numpy as np
import pytest
from conftest import build_mlp
from test_callback import diverging_regression

import keras_gradwatch as kg
from keras_gradwatch import GradWatch
from keras_gradwatch.run_record import RECORD_FILE, load_run
from keras_gradwatch.testing import assert_healthy_training

pytest_plugins = ["pytester", "keras_gradwatch.testing"]


def healthy_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.3]])).astype("float32")
    return x, y


@pytest.fixture(scope="module")
def exploding_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("exploding")
    model, x, y = diverging_regression()
    watch = GradWatch(log_dir=log_dir, update_freq="batch", on_exploding="stop", verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)
    assert {f.kind for f in watch.findings} == {"exploding_gradient"}
    return log_dir, watch


def test_healthy_training_passes():
    x, y = healthy_data()
    model = build_mlp(hidden=(16,))
    watch = GradWatch(verbose=0)
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[watch], verbose=0)

    assert_healthy_training(watch)
    assert_healthy_training(watch, forbid="any")


def test_exploding_finding_named_in_message(exploding_run):
    _, watch = exploding_run
    with pytest.raises(AssertionError) as raised:
        assert_healthy_training(watch)

    message = str(raised.value)
    assert message.startswith("Training was not healthy: GradWatch on model 'mlp' has ")
    assert "forbidden kind (exploding_gradient, nonfinite)" in message
    for finding in watch.findings:
        assert f"- {finding.describe()}" in message
    first = watch.findings[0]
    assert f"exploding_gradient at step {first.step} (epoch 0), layer(s) {first.layers[0]}" in (
        message
    )


@pytest.mark.parametrize("target", ["dir", "jsonl", "record"])
def test_run_records_checked(exploding_run, target):
    log_dir, watch = exploding_run
    source = {
        "dir": log_dir,
        "jsonl": str(log_dir / RECORD_FILE),
        "record": load_run(log_dir),
    }[target]
    with pytest.raises(AssertionError) as raised:
        assert_healthy_training(source)
    assert f"the run record {log_dir / RECORD_FILE} has {len(watch.findings)}" in str(raised.value)


@pytest.mark.parametrize(
    "forbid, fails",
    [
        (("vanishing", "loss"), False),
        ((), False),
        ("none", False),
        ("exploding_gradient", True),
        ("exploding", True),
        ("any", True),
    ],
)
def test_forbid_selects_kinds(exploding_run, forbid, fails):
    _, watch = exploding_run
    if fails:
        with pytest.raises(AssertionError, match="exploding_gradient at step"):
            assert_healthy_training(watch, forbid=forbid)
    else:
        assert_healthy_training(watch, forbid=forbid)


def test_invalid_arguments_rejected(tmp_path):
    with pytest.raises(AssertionError, match="recorded no training"):
        assert_healthy_training(GradWatch(verbose=0))
    with pytest.raises(ValueError, match="'exploded'"):
        assert_healthy_training(GradWatch(verbose=0), forbid=("exploded",))
    with pytest.raises(TypeError, match="Received: 42 of type int"):
        assert_healthy_training(42)
    with pytest.raises(kg.run_record.RecordError, match="not found"):
        assert_healthy_training(tmp_path / "missing")


def test_fixture_makes_gradwatch(gradwatch):
    watch = gradwatch(verbose=0, update_freq="batch")
    assert isinstance(watch, GradWatch)
    assert watch.update_freq == "batch"
    x, y = healthy_data()
    model = build_mlp(hidden=(16,))
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[watch], verbose=0)
    assert watch.epochs[0].steps == 4


INNER_TESTS = textwrap.dedent(
    """
    import warnings

    import keras
    import numpy as np

    from keras_gradwatch import GradientWarning

    pytest_plugins = ["keras_gradwatch.testing"]


    def fit(watch, scale, learning_rate):
        rng = np.random.default_rng(0)
        x = rng.normal(scale=scale, size=(256, 4)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientWarning)
            model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)


    def test_healthy(gradwatch):
        fit(gradwatch(verbose=0), scale=1.0, learning_rate=0.01)


    def test_exploding(gradwatch):
        fit(gradwatch(verbose=0), scale=10.0, learning_rate=0.05)


    def test_exploding_allowed(gradwatch):
        fit(gradwatch(verbose=0, forbid=()), scale=10.0, learning_rate=0.05)


    def test_unused(gradwatch):
        gradwatch(verbose=0)
    """
)


def test_fixture_fails_exploding_test_at_teardown(pytester):
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4, errors=1)
    output = result.stdout.str()
    assert "ERROR at teardown of test_exploding" in output
    assert "Training was not healthy: GradWatch on model" in output
    assert "exploding_gradient at step" in output
    assert "test_exploding_allowed" not in output.split("short test summary info")[-1]
