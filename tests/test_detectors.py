"""Each detector on scripted statistics: fires on the bad case, silent on the healthy one."""

import math

import numpy as np
import pytest
from scripted import make_layout, make_record, run_steps

from keras_gradwatch import Thresholds
from keras_gradwatch import detectors as D
from keras_gradwatch import findings as F
from keras_gradwatch.records import EpochAggregator, ModelLayout, VariableInfo, make_step_records
from keras_gradwatch.stats import STAT_INDEX, VARIABLE_STATS

HEALTHY_NORMS = [0.3, 0.5, 0.4, 0.2]


def healthy_records(layout, steps, start=0, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return [
        make_record(
            layout,
            start + s,
            np.array(HEALTHY_NORMS) * rng.uniform(0.7, 1.3, 4),
            loss=0.7 * math.exp(-s / 200) + 0.02 * rng.normal(),
        )
        for s in range(steps)
    ]


@pytest.fixture
def layout():
    return make_layout(4)


@pytest.mark.parametrize("detector_class", D.DEFAULT_DETECTORS)
def test_detectors_silent_on_healthy_run(layout, detector_class):
    thresholds = Thresholds()
    detector = detector_class(thresholds, layout)
    records = healthy_records(layout, 1500)
    found = run_steps(detector, records)
    aggregator = EpochAggregator(0)
    for record in records:
        aggregator.add(record)
    found += detector.on_epoch(aggregator.summary())
    assert found == []


def test_depth_decay_fires_after_patience(layout):
    detector = D.DepthProfileDetector(Thresholds(patience_steps=5), layout)
    norms = [1e-6, 1e-4, 1e-2, 1e-1]  # ratio 1e-5
    found = run_steps(detector, [make_record(layout, s, norms) for s in range(4)])
    assert found == []

    found = run_steps(detector, [make_record(layout, 4, norms)])

    (finding,) = found
    assert finding.kind == F.VANISHING
    assert finding.layers == ("layer_0", "layer_3")
    assert finding.step == 0
    assert finding.value == pytest.approx(1e-5)
    assert finding.threshold == 1e-3


def test_depth_decay_skips_dead_layer(layout):
    detector = D.DepthProfileDetector(Thresholds(patience_steps=1), layout)
    (finding,) = run_steps(detector, [make_record(layout, 0, [0.0, 1e-5, 1e-3, 1e-1])])
    assert finding.layers == ("layer_1", "layer_3")
    assert finding.value == pytest.approx(1e-4)


def test_depth_decay_resets_when_condition_breaks(layout):
    detector = D.DepthProfileDetector(Thresholds(patience_steps=3), layout)
    bad = [1e-6, 1e-4, 1e-2, 1e-1]
    records = [make_record(layout, s, bad if s % 2 == 0 else HEALTHY_NORMS) for s in range(10)]
    assert run_steps(detector, records) == []


def test_depth_growth_is_exploding(layout):
    detector = D.DepthProfileDetector(Thresholds(patience_steps=2), layout)
    norms = [1e3, 10.0, 1.0, 0.1]  # grows 1e4 towards the input
    found = run_steps(detector, [make_record(layout, s, norms) for s in range(2)])
    (finding,) = found
    assert finding.kind == F.EXPLODING
    assert finding.detector == "depth_growth"
    assert finding.value == pytest.approx(1e4)


def test_dead_layer_after_dead_steps(layout):
    detector = D.DeadLayerDetector(Thresholds(dead_steps=10), layout)
    records = [make_record(layout, s, [0.0, 0.1, 0.2, 0.3]) for s in range(12)]
    found = run_steps(detector, records)

    assert [f.step for f in found] == [0, 0, 0]
    assert [f.last_step for f in found] == [9, 10, 11]
    assert [f.value for f in found] == [10, 11, 12]
    assert all(f.layers == ("layer_0",) and f.kind == F.DEAD_LAYER for f in found)


def test_dead_layer_interrupted_run_not_reported(layout):
    detector = D.DeadLayerDetector(Thresholds(dead_steps=10), layout)
    records = [make_record(layout, s, [0.0 if s % 9 else 1e-8, 0.1, 0.2, 0.3]) for s in range(30)]
    assert run_steps(detector, records) == []


def test_no_gradient_is_not_dead(layout):
    detector = D.DeadLayerDetector(Thresholds(dead_steps=2), layout)
    records = [make_record(layout, s, [np.nan, 0.1, 0.2, 0.3]) for s in range(5)]
    assert run_steps(detector, records) == []


def test_spike_against_running_median(layout):
    thresholds = Thresholds(spike_window=20, spike_factor=10.0)
    detector = D.SpikeDetector(thresholds, layout)
    records = [make_record(layout, s, [0.5, 0.5, 0.5, 0.5]) for s in range(20)]
    records.append(make_record(layout, 20, [50.0, 0.5, 0.5, 0.5]))
    (finding,) = run_steps(detector, records)
    assert finding.kind == F.EXPLODING
    assert finding.step == 20
    assert finding.threshold == pytest.approx(10.0)  # 10 x median global norm 1.0
    assert finding.value == pytest.approx(math.sqrt(50.0**2 + 3 * 0.25))


def test_spike_needs_warm_up(layout):
    detector = D.SpikeDetector(Thresholds(spike_window=20), layout)
    records = [make_record(layout, 0, [0.01] * 4), make_record(layout, 1, [100.0] * 4)]
    assert run_steps(detector, records) == []


def test_ceiling_names_largest_layer(layout):
    detector = D.CeilingDetector(Thresholds(max_grad_norm=100.0), layout)
    (finding,) = run_steps(detector, [make_record(layout, 7, [500.0, 1.0, 1.0, 1.0])])
    assert finding.layers == ("layer_0",)
    assert finding.step == 7
    assert finding.threshold == 100.0


def test_nonfinite_localised_in_backprop_order(layout):
    detector = D.NonFiniteDetector(Thresholds(), layout)
    healthy = make_record(layout, 0, HEALTHY_NORMS)
    bad = make_record(
        layout, 1, [np.nan, np.inf, np.nan, 0.1], loss=float("nan"), nonfinite=[10, 3, 5, 0]
    )
    found = run_steps(detector, [healthy, bad])

    (finding,) = found
    assert finding.kind == F.NONFINITE
    assert finding.step == 1
    # layer_2 is the output-most layer with non-finite gradient entries.
    assert finding.layers == ("layer_2",)
    assert finding.value == 18


def test_nonfinite_loss_alone(layout):
    detector = D.NonFiniteDetector(Thresholds(), layout)
    (finding,) = run_steps(detector, [make_record(layout, 3, HEALTHY_NORMS, loss=float("inf"))])
    assert finding.layers == ()
    assert math.isinf(finding.value)


def test_nonfinite_weights(layout):
    detector = D.NonFiniteDetector(Thresholds(), layout)
    record = make_record(layout, 0, HEALTHY_NORMS, weight_norms=[1.0, np.inf, 1.0, 1.0])
    (finding,) = run_steps(detector, [record])
    assert finding.layers == ("layer_1",)
    assert finding.extra == {"source": "weights"}


def test_loss_scale_overflow_is_counted_not_reported(layout):
    detector = D.NonFiniteDetector(Thresholds(), layout, loss_scaling=True)
    record = make_record(
        layout, 0, [np.inf, 1.0, 1.0, 1.0], nonfinite=[2, 0, 0, 0], update_skipped=True
    )
    assert run_steps(detector, [record]) == []
    assert detector.loss_scale_skips == 1


def test_unseen_loss_is_not_nonfinite(layout):
    detector = D.NonFiniteDetector(Thresholds(), layout)
    record = make_record(layout, 0, HEALTHY_NORMS, loss=float("nan"), loss_seen=False)
    assert run_steps(detector, [record]) == []


def test_stagnation_after_patience_blocks(layout):
    thresholds = Thresholds(stagnation_window=10, stagnation_patience=3)
    detector = D.LossStagnationDetector(thresholds, layout)
    records = [make_record(layout, s, HEALTHY_NORMS, loss=0.6931) for s in range(40)]
    found = run_steps(detector, records)
    (finding,) = found
    assert finding.kind == F.LOSS_STAGNATION
    assert finding.step == 39
    assert finding.value == pytest.approx(0.0)


def test_oscillation_without_progress(layout):
    thresholds = Thresholds(oscillation_window=10, oscillation_patience=3)
    detector = D.LossOscillationDetector(thresholds, layout)
    losses = [0.6 if s % 2 else 0.9 for s in range(30)]
    found = run_steps(
        detector, [make_record(layout, s, HEALTHY_NORMS, loss=v) for s, v in enumerate(losses)]
    )
    (finding,) = found
    assert finding.kind == F.LOSS_OSCILLATION
    assert finding.step == 0
    assert finding.value == pytest.approx(0.3 / 0.75)


def test_oscillation_silent_when_loss_falls(layout):
    thresholds = Thresholds(oscillation_window=10, oscillation_patience=5)
    detector = D.LossOscillationDetector(thresholds, layout)
    losses = [(0.9 if s % 2 else 0.6) * (0.8 ** (s // 10)) for s in range(60)]
    assert (
        run_steps(
            detector, [make_record(layout, s, HEALTHY_NORMS, loss=v) for s, v in enumerate(losses)]
        )
        == []
    )


def test_small_update_on_epoch(layout):
    detector = D.SmallUpdateDetector(Thresholds(), layout)
    aggregator = EpochAggregator(2)
    for s in range(5):
        aggregator.add(
            make_record(layout, s, HEALTHY_NORMS, epoch=2, update_norms=[1e-9, 1e-3, 1e-3, 1e-3])
        )
    (finding,) = detector.on_epoch(aggregator.summary())
    assert finding.kind == F.SMALL_UPDATE
    assert finding.layers == ("layer_0",)
    assert finding.epoch == 2
    assert finding.value == pytest.approx(1e-9)


def test_weight_growth_within_epoch(layout):
    detector = D.WeightGrowthDetector(Thresholds(weight_growth=10.0), layout)
    aggregator = EpochAggregator(0)
    for s, scale in enumerate([1.0, 5.0, 20.0]):
        record = make_record(layout, s, HEALTHY_NORMS, weight_norms=[scale, 1.0, 1.0, 1.0])
        detector.on_step(record)
        aggregator.add(record)
    (finding,) = detector.on_epoch(aggregator.summary())
    assert finding.kind == F.EXPLODING
    assert finding.layers == ("layer_0",)
    assert finding.value == pytest.approx(20.0)


@pytest.mark.parametrize(
    "name, value",
    [
        ("patience_steps", 0),
        ("dead_steps", 2.5),
        ("decay_ratio", 0.0),
        ("decay_ratio", 2.0),
        ("spike_factor", 1.0),
        ("max_grad_norm", float("inf")),
        ("oscillation_progress", 1.5),
        ("stagnation_window", True),
        ("weight_growth", "10"),
    ],
)
def test_invalid_thresholds_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        Thresholds(**{name: value})


def test_finding_log_tracks_latest_detection(layout):
    detector = D.DeadLayerDetector(Thresholds(dead_steps=3), layout)
    log = F.FindingLog()
    for step in range(8):
        for finding in detector.on_step(make_record(layout, step, [0.0, 0.1, 0.2, 0.3])):
            log.add(finding)

    (finding,) = log.sorted()
    assert finding.step == 0
    assert finding.count == 6
    assert finding.last_step == 7
    assert finding.last_value == 8


def test_spike_baseline_is_running_median():
    layout = make_layout()
    detector = D.SpikeDetector(Thresholds(spike_window=6), layout)
    rng = np.random.default_rng(0)
    for step, norm in enumerate(rng.uniform(1.0, 2.0, size=20)):
        detector.on_step(make_record(layout, step, [norm] * 4))
        assert detector._sorted == sorted(detector.history)
        assert D._sorted_median(detector._sorted) == np.median(list(detector.history))


@pytest.mark.parametrize("layers", [["a", "a", "b", "c"], ["a", "b", "a", "c"]])
def test_step_records_combine_layers(layers):
    # Contiguous layers take the reduceat path, interleaved ones the per-layer path.
    layout = ModelLayout(
        [VariableInfo(path=f"v{i}", layer=name, shape=(3,)) for i, name in enumerate(layers)]
    )
    rng = np.random.default_rng(1)
    rows = rng.uniform(0.5, 2.0, size=(5, 4, len(VARIABLE_STATS)))
    rows[1, 0, STAT_INDEX["grad_norm"]] = np.nan  # a variable without gradient
    rows[2, 1, STAT_INDEX["grad_norm"]] = np.inf
    rows[3, :, STAT_INDEX["grad_max"]] = np.nan  # a step that did not measure max |g|
    scalars = rng.uniform(size=(5, 4))
    records = make_step_records(layout, 10, 0, rows, scalars)

    assert [r.step for r in records] == [10, 11, 12, 13, 14]
    for record, row in zip(records, rows, strict=True):
        for name, layer in enumerate(layout.layers):
            members = [i for i, owner in enumerate(layers) if owner == layer]
            norms = row[members, STAT_INDEX["grad_norm"]]
            present = norms[~np.isnan(norms)]
            expected = np.sqrt(np.sum(present**2)) if present.size else np.nan
            np.testing.assert_array_equal(record.layer("grad_norm")[name], expected)
            maxes = row[members, STAT_INDEX["grad_max"]]
            expected_max = np.nanmax(maxes) if not np.all(np.isnan(maxes)) else np.nan
            np.testing.assert_array_equal(record.layer("grad_max")[name], expected_max)
