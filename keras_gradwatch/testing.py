"""Test helpers: assert that training stayed healthy, and a pytest fixture.

```python
from keras_gradwatch.testing import assert_healthy_training

watch = GradWatch()
model.fit(x, y, epochs=3, callbacks=[watch])
assert_healthy_training(watch)  # or a log_dir, gradwatch.jsonl or report.json
```

With pytest, load this module as a plugin in a test module or in the
top-level `conftest.py`:

```python
pytest_plugins = ["keras_gradwatch.testing"]


def test_training(gradwatch):
    watch = gradwatch()  # a GradWatch; the keyword arguments go to GradWatch
    model.fit(x, y, epochs=3, callbacks=[watch])
    # At teardown, every GradWatch made here that saw a fit is checked.
```

The module imports pytest only if it is installed, so
`assert_healthy_training` also works without it. The module raises
`AssertionError` itself, so it needs no assertion rewriting. The marker
PYTEST_DONT_REWRITE turns rewriting off, which also stops pytest from warning
when a test module imports this module before loading it as a plugin.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from keras_gradwatch.run_record import RunRecord, load_run, select_kinds

DEFAULT_FORBID = ("exploding", "nonfinite")


def assert_healthy_training(watch_or_path, forbid: Iterable[str] | str = DEFAULT_FORBID) -> None:
    """Raise `AssertionError` if training produced a finding of a forbidden kind.

    Args:
        watch_or_path: a `GradWatch` after `fit`, a `RunRecord`, or the path
            of a run record (a `log_dir`, `gradwatch.jsonl` or `report.json`).
        forbid: finding kinds or groups that fail the assertion, as accepted
            by `gradwatch check --fail-on`: kinds such as
            `"exploding_gradient"`, the groups `"exploding"`, `"vanishing"`,
            `"nonfinite"` and `"loss"`, or `"any"`. Defaults to exploding
            gradients and non-finite values.

    The message lists every offending finding with `Finding.describe()`,
    which names the layers, the first step and a remedy. Raises
    `ValueError` for an unknown name in `forbid`, `RecordError` for an
    unreadable record, and `AssertionError` for a `GradWatch` that has not
    been used in `fit`.
    """
    kinds = select_kinds(forbid)
    findings, source = _findings_and_source(watch_or_path)
    offending = [finding for finding in findings if finding.kind in kinds]
    if not offending:
        return
    lines = [
        f"Training was not healthy: {source} has {len(offending)} finding(s) of a "
        f"forbidden kind ({', '.join(sorted(kinds))}):"
    ]
    lines.extend(f"- {finding.describe()}" for finding in offending)
    raise AssertionError("\n".join(lines))


def _findings_and_source(watch_or_path) -> tuple[list, str]:
    if isinstance(watch_or_path, (str, os.PathLike)):
        record = load_run(watch_or_path)
        return record.findings, f"the run record {record.path}"
    if isinstance(watch_or_path, RunRecord):
        return watch_or_path.findings, f"the run record {watch_or_path.path}"

    from keras_gradwatch.callback import GradWatch

    if not isinstance(watch_or_path, GradWatch):
        raise TypeError(
            "assert_healthy_training expects a GradWatch, a RunRecord or the path of a "
            f"run record. Received: {watch_or_path!r} of type {type(watch_or_path).__name__}"
        )
    if watch_or_path.layout is None:
        raise AssertionError(
            "This GradWatch has recorded no training: pass it to "
            "model.fit(..., callbacks=[watch]) before checking it."
        )
    model = getattr(watch_or_path, "model", None)
    name = getattr(model, "name", None)
    source = f"GradWatch on model {name!r}" if name else "GradWatch"
    return watch_or_path.findings, source


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional
    pytest = None

if pytest is not None:

    @pytest.fixture
    def gradwatch():
        """Make `GradWatch` callbacks that are checked when the test ends.

        The fixture is a function: `gradwatch(forbid=..., **kwargs)` returns
        `GradWatch(**kwargs)`. At teardown, each one that was used in `fit`
        is checked with `assert_healthy_training(watch, forbid)`, and pytest
        reports a failure as an error in the test's teardown. `forbid`
        defaults to exploding gradients and non-finite values. Pass
        `forbid=()` to skip the check, for example in a test that expects a
        `"raise"` policy to stop `fit`.
        """
        from keras_gradwatch.callback import GradWatch

        made: list[tuple[GradWatch, frozenset[str]]] = []

        def make_watch(*, forbid: Iterable[str] | str = DEFAULT_FORBID, **kwargs) -> GradWatch:
            kinds = select_kinds(forbid)
            watch = GradWatch(**kwargs)
            made.append((watch, kinds))
            return watch

        yield make_watch

        failures = []
        for watch, kinds in made:
            if watch.layout is None or not kinds:
                continue
            try:
                assert_healthy_training(watch, forbid=kinds)
            except AssertionError as failure:
                failures.append(str(failure))
        if failures:
            raise AssertionError("\n".join(failures))
