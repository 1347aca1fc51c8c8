"""Warning categories and exceptions raised by `GradWatch`.

Every finding kind has its own warning category, so a user can filter or
escalate exactly one of them, for example with
`python -W error::keras_gradwatch.ExplodingGradientWarning` or
`warnings.simplefilter("ignore", keras_gradwatch.LossOscillationWarning)`.
"""

from __future__ import annotations


class GradientWarning(RuntimeWarning):
    """Base category of every warning that `GradWatch` emits."""


class VanishingGradientWarning(GradientWarning):
    """Gradients shrink with depth, or updates are too small to move the weights."""


class DeadLayerWarning(VanishingGradientWarning):
    """A layer's gradient is exactly zero for many consecutive steps."""


class ExplodingGradientWarning(GradientWarning):
    """Gradient norms spike, grow towards the input, pass a ceiling, or weights grow fast."""


class NonFiniteWarning(GradientWarning):
    """NaN or Inf appeared in the loss, the gradients or the weights."""


class LossStagnationWarning(GradientWarning):
    """The training loss stopped improving."""


class LossOscillationWarning(GradientWarning):
    """The training loss swings widely from batch to batch without improving."""


class GradientError(RuntimeError):
    """Base of the exceptions raised by the `"raise"` policy.

    Attributes:
        finding: the `Finding` that triggered the exception. Its `step`,
            `epoch` and `layers` say where the problem appeared.
    """

    def __init__(self, finding):
        super().__init__(finding.describe())
        self.finding = finding


class VanishingGradientError(GradientError):
    """Raised for a vanishing-gradient or dead-layer finding under `"raise"`."""


class ExplodingGradientError(GradientError):
    """Raised for an exploding-gradient finding under `"raise"`."""


class NonFiniteError(GradientError):
    """Raised for a non-finite finding under `"raise"`."""


class LossBehaviourError(GradientError):
    """Raised for a loss stagnation or oscillation finding under `"raise"`."""
