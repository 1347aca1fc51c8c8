"""Sinks: outputs that receive what `GradWatch` records and write it somewhere.

A sink only writes. `GradWatch` calls its hooks in this order during `fit`:
`open` once, then `on_step` for every step record as the host reads it,
`on_finding` for every new finding, `on_epoch` after each epoch's summary,
and `close` at the end of training, also when training stops with an
exception raised by a policy. A sink must never stop training: an error in a
hook is logged by `GradWatch` and the sink is switched off for the rest of the
run (see `GradWatch._call_sinks`).
"""

from __future__ import annotations


class Sink:
    """Base class with no-op hooks; override the ones a sink needs."""

    name = "sink"

    def open(self, watch) -> None:
        """Start a run. `watch.layout` and `watch.model` are set."""

    def on_step(self, record) -> None:
        """Receive one `StepRecord`, in step order."""

    def on_finding(self, finding) -> None:
        """Receive a finding the first time it is detected."""

    def on_epoch(self, summary, watch) -> None:
        """Receive an `EpochSummary` after the epoch's steps and findings."""

    def close(self, watch) -> None:
        """End the run: flush and release files. Called once."""
