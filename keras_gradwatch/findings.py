"""Findings: what the detectors report, and the log that merges repeats."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from keras_gradwatch import errors

# Finding kinds, their policy group, warning category, exception and severity
# (a higher severity sorts first in `GradWatch.findings`).
VANISHING = "vanishing_gradient"
DEAD_LAYER = "dead_layer"
SMALL_UPDATE = "small_update"
EXPLODING = "exploding_gradient"
NONFINITE = "nonfinite"
LOSS_STAGNATION = "loss_stagnation"
LOSS_OSCILLATION = "loss_oscillation"


@dataclass(frozen=True)
class KindInfo:
    group: str
    warning: type[Warning]
    error: type[errors.GradientError]
    severity: int


KINDS: dict[str, KindInfo] = {
    NONFINITE: KindInfo("nonfinite", errors.NonFiniteWarning, errors.NonFiniteError, 4),
    EXPLODING: KindInfo(
        "exploding", errors.ExplodingGradientWarning, errors.ExplodingGradientError, 3
    ),
    DEAD_LAYER: KindInfo("vanishing", errors.DeadLayerWarning, errors.VanishingGradientError, 2),
    VANISHING: KindInfo(
        "vanishing", errors.VanishingGradientWarning, errors.VanishingGradientError, 2
    ),
    SMALL_UPDATE: KindInfo(
        "vanishing", errors.VanishingGradientWarning, errors.VanishingGradientError, 1
    ),
    LOSS_OSCILLATION: KindInfo("loss", errors.LossOscillationWarning, errors.LossBehaviourError, 1),
    LOSS_STAGNATION: KindInfo("loss", errors.LossStagnationWarning, errors.LossBehaviourError, 1),
}

# Policy groups, as accepted by the `on_*` arguments of `GradWatch`.
POLICY_GROUPS = ("vanishing", "exploding", "nonfinite", "loss")


@dataclass
class Finding:
    """One detected condition, merged over the steps where it held.

    Attributes:
        kind: one of the finding kinds, e.g. `"vanishing_gradient"`.
        layers: names of the layers concerned, input side first.
        step: global training step (0-based, counted over the `fit` call)
            where the condition started. For a sustained condition it is the
            first step of the run of steps that triggered the finding.
        epoch: epoch (0-based) of `step`.
        value: the observed value that crossed the threshold, first time.
        threshold: the threshold it crossed.
        message: a plain description of what was observed.
        remedy: what usually fixes this condition.
        detector: name of the check that produced it (e.g. `"depth_decay"`).
        count: how many times the condition was detected.
        last_step: the step of the latest detection.
        last_value: the observed value at `last_step`.
    """

    kind: str
    layers: tuple[str, ...]
    step: int
    epoch: int
    value: float
    threshold: float
    message: str
    remedy: str
    detector: str
    count: int = 1
    last_step: int = -1
    last_value: float = math.nan
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.last_step < 0:
            self.last_step = self.step
        if math.isnan(self.last_value):
            self.last_value = self.value

    @property
    def severity(self) -> int:
        return KINDS[self.kind].severity

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.kind, self.detector, self.layers)

    def describe(self) -> str:
        """Return the one-paragraph text used in warnings and exceptions."""
        where = ", ".join(self.layers) if self.layers else "whole model"
        repeat = ""
        if self.count > 1:
            repeat = f" Seen {self.count} times, last at step {self.last_step}."
        return (
            f"{self.kind} at step {self.step} (epoch {self.epoch}), layer(s) {where}: "
            f"{self.message} (value {_format_number(self.value)}, "
            f"threshold {_format_number(self.threshold)}).{repeat} Remedy: {self.remedy}"
        )

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict; non-finite numbers become strings."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["severity"] = self.severity
        for name in ("value", "threshold", "last_value"):
            data[name] = json_number(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Finding:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["layers"] = tuple(values.get("layers", ()))
        for name in ("value", "threshold", "last_value"):
            if name in values:
                values[name] = float(values[name])
        return cls(**values)


def json_number(value: float) -> float | str:
    """Return `value` as a float, or as "nan"/"inf"/"-inf" text when not finite."""
    value = float(value)
    if math.isfinite(value):
        return value
    return str(value)


def _format_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


class FindingLog:
    """Findings of one run, merged by (kind, detector, layers).

    `add` returns True only the first time a key is seen, which is when a
    warning is emitted; later detections update `count`, `last_step` and
    `last_value` of the existing finding.
    """

    def __init__(self):
        self._findings: dict[tuple, Finding] = {}

    def add(self, finding: Finding) -> bool:
        existing = self._findings.get(finding.key)
        if existing is None:
            self._findings[finding.key] = finding
            return True
        existing.count += 1
        existing.last_step = finding.last_step
        existing.last_value = finding.value
        return False

    def get(self, key) -> Finding | None:
        return self._findings.get(key)

    def sorted(self) -> list[Finding]:
        """Return the findings, most severe first, then by first step."""
        return sorted(self._findings.values(), key=lambda f: (-f.severity, f.step, f.layers))

    def __len__(self) -> int:
        return len(self._findings)
