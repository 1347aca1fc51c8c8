"""Instrumentation of a Keras model's own TensorFlow train step.

`StepInstrument` rebuilds `model.train_function` around the model's unchanged
`train_step`. While the step is traced, two hooks are in place:

- `model.compute_loss` is wrapped to see the batch loss;
- `model.optimizer.apply` is wrapped to see the gradients exactly as the
  optimizer receives them, and the weights just before and after the update.

The statistics are reduced in the graph (see `stats.py`) and written into a
ring buffer of `tf.Variable`s on the device. The host reads that buffer only
when asked, so the step itself never waits for the host. The hooks live only
during tracing (or during each eager step with `run_eagerly=True`), and
`uninstall()` puts the stock train function back.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from keras_gradwatch import stats as stats_lib


@dataclass
class _TraceState:
    """Tensors seen by the hooks while one train step is traced."""

    loss: tf.Tensor | None = None
    variable_stats: tf.Tensor | None = None
    global_grad_norm: tf.Tensor | None = None
    update_skipped: tf.Tensor | None = None
    weights_measured: tf.Tensor | bool = False


class StepInstrument:
    """Instrumented train function for one model and one `fit` call.

    Args:
        model: the compiled Keras model. Its `train_step` is used unchanged.
        variables: the trainable variables to record, in forward order.
        capacity: number of steps the device ring buffer holds. The host must
            read at least every `capacity` steps or the oldest rows are lost.
        guard_nonfinite: when True, an update whose loss or gradients are not
            finite is skipped, and so are all later updates, so the weights
            stay at their last finite values until training stops.
        log_grad_norm: when True, the step adds the global gradient norm to
            its returned logs as `grad_norm`.
        measure_every: compute the measured-step statistics (gradient zero
            fraction, weight norm, update norm) on every this many optimizer
            iterations, and on every step while `measure_armed` is True; 0
            never computes them. With gradient accumulation it is rounded up
            to a multiple of the accumulation steps. Any value but 0 keeps a
            copy of the trainable weights on the device, for the update norm.
        max_every_step: when True, max |g| is computed on every step, not
            only on measured steps and where a norm is 0 or not finite.
        store_gradients: when True, steps that run while `store_armed` is
            True bucket every gradient into `gradient_histograms`, a
            `(n_vars, HISTOGRAM_BUCKETS, 3)` variable of `stats.histogram`
            rows; rows of variables without a gradient are 0. Only the
            buckets are kept, not the gradients.
    """

    def __init__(
        self,
        model,
        variables,
        capacity: int,
        guard_nonfinite: bool,
        log_grad_norm: bool = False,
        measure_every: int = 1,
        max_every_step: bool = False,
        store_gradients: bool = False,
    ):
        self.model = model
        self.variables = list(variables)
        self.capacity = int(capacity)
        self.guard_nonfinite = guard_nonfinite
        self.log_grad_norm = log_grad_norm
        self._index = {id(v): i for i, v in enumerate(self.variables)}
        self._sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.measure_every = _round_to_accumulation(int(measure_every), model.optimizer)
        self.max_every_step = max_every_step
        self._jit_compile = bool(getattr(model, "jit_compile", False))
        self._original_train_function = None
        self._instrumented_function = None
        self._installed = False
        self._hooks = _Hooks(self)
        # Python-side facts learned while tracing, for the callback to report.
        self.optimizer_apply_seen = False
        self.loss_seen = False

        n_vars = len(self.variables)
        with tf.init_scope():
            # One row per step: the per-variable statistics, flattened, then
            # the step scalars. One buffer, so the host reads it in one call.
            self.row_width = n_vars * len(stats_lib.VARIABLE_STATS) + len(stats_lib.STEP_SCALARS)
            self.buffer = tf.Variable(
                tf.zeros([self.capacity, self.row_width]),
                trainable=False,
                name="gradwatch_step_records",
            )
            self.steps_written = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name="gradwatch_steps"
            )
            self.finite_so_far = tf.Variable(True, trainable=False, name="gradwatch_finite")
            self.measure_armed = tf.Variable(False, trainable=False, name="gradwatch_measure")
            # Weights before the update, for the update norm: the small
            # variables in one flat vector (one copy op), the others one each.
            self.snapshots = []
            self.small_snapshot = None
            small = [i for i, size in enumerate(self._sizes) if size <= FUSE_LIMIT]
            self._small = small
            offsets = np.cumsum([0] + [self._sizes[i] for i in small])
            self._small_offset = {i: int(offset) for i, offset in zip(small, offsets)}
            if self.measure_every:
                self.small_snapshot = tf.Variable(
                    tf.zeros([sum(self._sizes[i] for i in small)], tf.float32),
                    trainable=False,
                    name="gradwatch_prior_small",
                )
                self.snapshots = [
                    None
                    if i in self._small_offset
                    else tf.Variable(
                        tf.zeros(v.shape, v.dtype), trainable=False, name="gradwatch_prior"
                    )
                    for i, v in enumerate(self.variables)
                ]
            self.gradient_histograms = None
            self.store_armed = None
            if store_gradients:
                self.store_armed = tf.Variable(False, trainable=False, name="gradwatch_armed")
                self.gradient_histograms = tf.Variable(
                    tf.zeros([n_vars, stats_lib.HISTOGRAM_BUCKETS, 3], tf.float64),
                    trainable=False,
                    name="gradwatch_gradient_histograms",
                )

    # -- installation -----------------------------------------------------

    def install(self) -> None:
        """Replace `model.train_function` with the instrumented one."""
        model = self.model
        self._original_train_function = model.train_function
        step_function = model.train_step

        def instrumented_train_step(data):
            return self._run_step(step_function, data)

        # `make_train_function(force=True)` wraps whatever `model.train_step`
        # is at that moment, with Keras's own distribution, `steps_per_execution`
        # and `jit_compile` handling. The instance attribute is removed again
        # right after, so the model's class method is untouched.
        model.train_step = instrumented_train_step
        try:
            model.make_train_function(force=True)
        finally:
            del model.train_step
        self._instrumented_function = model.train_function
        self._installed = True

    def can_reinstall(self) -> bool:
        """Return True if the stock train function is still the one replaced last.

        Keras rebuilds `model.train_function` after `compile()`; then the
        instrumented function, traced against the old one, must not be reused.
        """
        return (
            not self._installed
            and self._instrumented_function is not None
            and self.model.train_function is self._original_train_function
        )

    def reinstall(self) -> None:
        """Install the already traced function again, with emptied buffers."""
        self.steps_written.assign(0)
        self.finite_so_far.assign(True)
        self.measure_armed.assign(False)
        if self.store_armed is not None:
            self.store_armed.assign(False)
        self.model.train_function = self._instrumented_function
        self._installed = True

    def uninstall(self) -> None:
        """Put back the train function that was in place before `install`."""
        if self._installed:
            self.model.train_function = self._original_train_function
            self._installed = False

    # -- the step ---------------------------------------------------------

    def _run_step(self, step_function, data):
        state = _TraceState()
        with self._hooks.active(state):
            logs = step_function(data)
        self._write_record(state)
        if self.log_grad_norm and state.global_grad_norm is not None and isinstance(logs, dict):
            logs = dict(logs)
            logs["grad_norm"] = state.global_grad_norm
        return logs

    def _instrumented_apply(self, state, original_apply, optimizer, grads, variables):
        unscaled = _sum_over_replicas(_unscale(optimizer, grads))
        gradients = {}
        for gradient, variable in zip(unscaled, variables):
            index = self._index.get(id(variable))
            if index is not None and gradient is not None:
                gradients[index] = gradient
        fused = [
            i
            for i in sorted(gradients)
            if not isinstance(gradients[i], tf.IndexedSlices) and 0 < self._sizes[i] <= FUSE_LIMIT
        ]
        separate = [i for i in sorted(gradients) if i not in set(fused)]
        without = [i for i in range(len(self.variables)) if i not in gradients]
        n_with = len(fused) + len(separate)
        order = fused + separate + without

        if self.gradient_histograms is not None:
            self._store_gradient_histograms(gradients)

        # Every step: the L2 norm. Small variables share one flat vector with
        # a segment each, which keeps the op count low for models with many
        # small layers. Large and sparse gradients get their own reductions.
        values = {}
        norm_parts = []
        if fused:
            fused_ids = stats_lib.segment_ids([self._sizes[i] for i in fused])
            fused_flat = tf.concat([stats_lib.flat32(gradients[i]) for i in fused], axis=0)
            norm_parts.append(stats_lib.segment_l2_norm(fused_flat, fused_ids, len(fused)))
        for i in separate:
            gradient = gradients[i]
            if isinstance(gradient, tf.IndexedSlices):
                gradient = stats_lib.summed_rows(gradient)
            values[i] = stats_lib.flat32(gradient)
            norm_parts.append(stats_lib.l2_norm(values[i])[None])
        norms = tf.concat(norm_parts, axis=0) if norm_parts else tf.zeros([0])
        measure = self._measure_condition(optimizer)

        def per_variable(segment_fn, dense_fn):
            parts = []
            if fused:
                parts.append(segment_fn(fused_flat, fused_ids, len(fused)))
            parts.extend(dense_fn(values[i])[None] for i in separate)
            return tf.concat(parts, axis=0)

        def count_nonfinite():
            return per_variable(stats_lib.segment_nonfinite_count, stats_lib.nonfinite_count)

        def max_abs():
            return per_variable(stats_lib.segment_max_abs, stats_lib.max_abs)

        nan = tf.constant(float("nan"))
        if n_with:
            # A finite sum of squares means every entry is finite, so the
            # entries are counted only when a norm is not finite.
            norms_finite = tf.reduce_all(tf.math.is_finite(norms))
            nonfinite = tf.cond(norms_finite, lambda: tf.zeros([n_with]), count_nonfinite)
            # max |g| on measured steps, and wherever a norm is 0 or not
            # finite: only max |g| distinguishes an all-zero gradient from one
            # whose squares underflow.
            if self.max_every_step or measure is True:
                need_max = True
            else:
                unusual = tf.logical_not(tf.reduce_all(norms > 0.0))
                need_max = unusual if measure is False else tf.logical_or(measure, unusual)
            maxes = _when(need_max, max_abs, lambda: tf.fill([n_with], nan))
        else:
            nonfinite = tf.zeros([0])
            maxes = tf.zeros([0])

        step_finite = tf.reduce_all(tf.equal(nonfinite, 0.0))
        if state.loss is not None:
            loss_finite = tf.reduce_all(tf.math.is_finite(tf.cast(state.loss, tf.float32)))
            step_finite = tf.logical_and(step_finite, loss_finite)

        # Measured steps: copy the weights before the update, for the update norm.
        def take_snapshot():
            if self._small:
                small = [stats_lib.flat32(self.variables[i].value) for i in self._small]
                self.small_snapshot.assign(tf.concat(small, axis=0))
            for i in fused + separate:
                if self.snapshots[i] is not None:
                    self.snapshots[i].assign(self.variables[i].value)
            return tf.constant(True)

        def before(i):
            """Flat float32 weights of variable i before the update."""
            if self.snapshots[i] is not None:
                return stats_lib.flat32(self.snapshots[i])
            start = self._small_offset[i]
            return self.small_snapshot[start : start + self._sizes[i]]

        snapshot = _when(measure, take_snapshot, lambda: tf.constant(False))
        with tf.control_dependencies([snapshot]):
            skipped = self._apply_update(original_apply, optimizer, grads, variables, step_finite)

        def measure_weights():
            rows = []
            if fused:
                sizes = [self._sizes[i] for i in fused]
                after = tf.concat([stats_lib.flat32(self.variables[i].value) for i in fused], 0)
                if fused == self._small:
                    fused_before = tf.convert_to_tensor(self.small_snapshot)
                else:
                    fused_before = tf.concat([before(i) for i in fused], axis=0)
                zeros = stats_lib.segment_zero_count(fused_flat, fused_ids, len(fused))
                zero_fraction = zeros / tf.constant(sizes, tf.float32)
                update = after - fused_before
                weight_norms = stats_lib.segment_norms(tf.stack([after, update], axis=1), sizes)
                rows.append(tf.concat([zero_fraction[:, None], weight_norms], axis=1))
            for i in separate:
                zero_fraction = stats_lib.zero_fraction(values[i], self._sizes[i])
                after = self.variables[i].value
                update = stats_lib.flat32(after) - before(i)
                pair = [stats_lib.l2_norm(after), stats_lib.l2_norm(update)]
                rows.append(tf.stack([zero_fraction] + pair)[None])
            for i in without:
                rows.append(tf.stack([nan, stats_lib.l2_norm(self.variables[i].value), nan])[None])
            return tf.concat(rows, axis=0)

        def not_measured():
            return tf.fill([len(order), 3], nan)

        with tf.control_dependencies([skipped]):
            weight_table = _when(measure, measure_weights, not_measured)
        gradient_table = tf.stack([norms, maxes, nonfinite, tf.ones([n_with])], axis=1)
        if without:
            missing = tf.stack([nan, nan, nan, 0.0])
            gradient_table = tf.concat(
                [gradient_table, tf.tile(missing[None], [len(without), 1])], axis=0
            )
        # Columns in the order of VARIABLE_STATS; rows in the order fused,
        # separate, without, put back in the order of `self.variables`.
        table = tf.concat([gradient_table[:, :3], weight_table, gradient_table[:, 3:]], axis=1)
        if order != sorted(order):
            position = np.argsort(np.array(order, dtype=np.int64))
            table = tf.gather(table, tf.constant(position, tf.int32))

        state.variable_stats = table
        state.global_grad_norm = tf.norm(norms)
        state.update_skipped = skipped
        state.weights_measured = measure
        self.optimizer_apply_seen = True

    def _measure_condition(self, optimizer):
        """Return whether this step computes the measured-step statistics.

        A Python bool where that is known while tracing, else a boolean tensor.
        """
        if self.measure_every == 0 or not _is_first_replica():
            return False
        if self.measure_every == 1:
            return True
        # The optimizer's count of `apply` calls, read before it increments.
        # With gradient accumulation `measure_every` is a multiple of the
        # accumulation steps, and Keras updates the weights on the calls where
        # (count + 1) is a multiple of them, so the measured steps update.
        calls = _apply_count(optimizer)
        due = tf.equal(tf.math.floormod(calls + 1, self.measure_every), 0)
        return tf.logical_or(due, self.measure_armed)

    def _store_gradient_histograms(self, gradients: dict):
        """Bucket the gradients into `gradient_histograms` when the host armed it."""

        def store():
            rows = []
            for i in range(len(self.variables)):
                if i not in gradients:
                    rows.append(tf.zeros([stats_lib.HISTOGRAM_BUCKETS, 3], tf.float64))
                    continue
                # One gradient after the other, so that the temporary memory
                # is that of the largest. An IndexedSlices gradient is
                # densified here, in armed steps only.
                with tf.control_dependencies(rows[-1:]):
                    gradient = tf.convert_to_tensor(gradients[i])
                    rows.append(stats_lib.histogram(gradient, xla=self._jit_compile))
            self.gradient_histograms.assign(tf.stack(rows))
            return tf.constant(True)

        tf.cond(self.store_armed, store, lambda: tf.constant(False))

    def _apply_update(self, original_apply, optimizer, grads, variables, step_finite):
        """Run the optimizer update; return 1.0 if it was skipped, else 0.0."""
        context = tf.distribute.get_replica_context()
        multi_replica = context is not None and context.num_replicas_in_sync > 1
        # NOTE: multi-replica training runs unguarded. The optimizer
        # synchronises replicas inside `apply` (a merge call), which a `tf.cond`
        # in replica context cannot contain. The callback then restores its
        # host copy of the last finite weights instead.
        if not self.guard_nonfinite or multi_replica:
            original_apply(grads, variables)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                # The loss scale optimizer skips updates with non-finite
                # gradients by itself and lowers the scale.
                return 1.0 - tf.cast(step_finite, tf.float32)
            return tf.constant(0.0)

        proceed = tf.logical_and(self.finite_so_far, step_finite)

        def update():
            original_apply(grads, variables)
            return tf.constant(0.0)

        def skip():
            return tf.constant(1.0)

        skipped = tf.cond(proceed, update, skip)
        self.finite_so_far.assign(proceed)
        return skipped

    def _write_record(self, state: _TraceState) -> None:
        n_stats = len(stats_lib.VARIABLE_STATS)
        nan = tf.constant(float("nan"))
        if state.variable_stats is None:
            rows = tf.fill([len(self.variables), n_stats], nan)
            global_grad_norm = nan
            skipped = tf.constant(0.0)
            measured = tf.constant(0.0)
        else:
            rows = state.variable_stats
            global_grad_norm = state.global_grad_norm
            skipped = tf.cast(state.update_skipped, tf.float32)
            measured = tf.cast(state.weights_measured, tf.float32)
        if state.loss is not None:
            self.loss_seen = True
            # Under a distribution strategy each replica's loss is already
            # divided by the number of replicas, so their sum is the batch loss.
            (loss,) = _sum_over_replicas([tf.reduce_mean(tf.cast(state.loss, tf.float32))])
        else:
            loss = nan

        if not _is_first_replica():
            # Every replica computed the same (all-reduced) statistics; the
            # first one records them.
            return
        # A scatter, not `buffer[slot].assign(...)`: XLA needs the bounds of a
        # slice assignment at compile time and would compile the step again
        # for every slot.
        slot = tf.cast(tf.math.floormod(self.steps_written, self.capacity), tf.int32)[None]
        scalars = tf.stack([loss, global_grad_norm, skipped, measured])
        row = tf.concat([tf.reshape(rows, [-1]), scalars], axis=0)
        self.buffer.scatter_update(tf.IndexedSlices(row[None], slot))
        self.steps_written.assign_add(1)

    # -- host side --------------------------------------------------------

    def read(self, first_step: int) -> tuple[int, np.ndarray, np.ndarray, int]:
        """Read the steps written since `first_step`.

        Returns `(first, variable_stats, step_scalars, lost)`: the step number
        of the first row returned, arrays of shape `(steps, n_vars, n_stats)`
        and `(steps, n_scalars)`, and how many steps were overwritten in the
        ring buffer before they could be read.
        """
        written = int(self.steps_written.numpy())
        lost = max(0, written - first_step - self.capacity)
        first = first_step + lost
        if written <= first:
            n_vars = len(self.variables)
            empty_vars = np.zeros((0, n_vars, len(stats_lib.VARIABLE_STATS)), np.float32)
            empty_scalars = np.zeros((0, len(stats_lib.STEP_SCALARS)), np.float32)
            return first, empty_vars, empty_scalars, lost
        slots = np.arange(first, written) % self.capacity
        if self.capacity * self.row_width <= FULL_READ_LIMIT:
            # One read of a small buffer costs less than a gather on the device.
            rows = self.buffer.numpy()[slots]
        else:
            # Only the unread rows are copied from the device.
            rows = tf.gather(self.buffer, tf.constant(slots, tf.int32)).numpy()
        n_stats = len(self.variables) * len(stats_lib.VARIABLE_STATS)
        variable_rows = rows[:, :n_stats].reshape(len(slots), len(self.variables), -1)
        return first, variable_rows, rows[:, n_stats:], lost


# The trace state of the GradWatch step being traced in this thread, for
# `record_loss`.
_ACTIVE = threading.local()


def record_loss(loss):
    """Report the batch loss from a custom `train_step` to GradWatch.

    GradWatch gets the loss from `model.compute_loss`. A `train_step` that
    computes its loss another way can pass it here, inside the step, so that
    the loss detectors and the report get it. Outside a step traced by
    GradWatch this does nothing. Returns `loss` unchanged.

    Example:

    ```python
    class MyModel(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = my_loss(y, self(x, training=True))
            keras_gradwatch.record_loss(loss)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}
    ```
    """
    state = getattr(_ACTIVE, "state", None)
    if state is not None:
        state.loss = loss
    return loss


# Ring buffers of at most this many entries (256 KiB of float32) are read
# whole: one read op costs less than a gather on the device.
FULL_READ_LIMIT = 1 << 16

# Variables with at most this many entries have their statistics computed
# together, in one flat vector; larger ones one by one, without the copy.
FUSE_LIMIT = 1 << 16


def _flat(tensor) -> tf.Tensor:
    return tf.reshape(tf.cast(tensor, tf.float32), [-1])


class _Hooks:
    """Wraps `model.compute_loss` and `optimizer.apply` while steps are traced.

    `tf.distribute.MirroredStrategy` traces the step once per replica, in
    parallel threads, so the wrappers are installed once for all threads
    (reference-counted under a lock) and route what they see to the calling
    thread's own `_TraceState`. A call from a thread with no active state
    passes straight through.
    """

    def __init__(self, instrument: StepInstrument):
        self.instrument = instrument
        self._lock = threading.Lock()
        self._depth = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def active(self, state: _TraceState):
        self._local.state = state
        _ACTIVE.state = state
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._remove()
            self._local.state = None
            _ACTIVE.state = None

    def _state(self) -> _TraceState | None:
        return getattr(self._local, "state", None)

    def _install(self) -> None:
        model = self.instrument.model
        optimizer = model.optimizer
        original_compute_loss = model.compute_loss
        original_apply = optimizer.apply

        def compute_loss(*args, **kwargs):
            loss = original_compute_loss(*args, **kwargs)
            state = self._state()
            if state is not None:
                state.loss = loss
            return loss

        def apply(grads, trainable_variables=None):
            state = self._state()
            if state is None:
                return original_apply(grads, trainable_variables)
            if trainable_variables is None:
                trainable_variables = optimizer._trainable_variables
            return self.instrument._instrumented_apply(
                state, original_apply, optimizer, list(grads), list(trainable_variables)
            )

        model.compute_loss = compute_loss
        optimizer.apply = apply

    def _remove(self) -> None:
        model = self.instrument.model
        del model.optimizer.apply
        del model.compute_loss


def _when(condition, true_fn, false_fn):
    """`tf.cond`, or just the chosen branch when `condition` is a Python bool."""
    if isinstance(condition, bool):
        return true_fn() if condition else false_fn()
    return tf.cond(condition, true_fn, false_fn)


def _round_to_accumulation(every: int, optimizer) -> int:
    """Round `every` up to a multiple of the optimizer's gradient accumulation steps."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    steps = int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)
    if every <= 1 or steps <= 1:
        return every
    return -(-every // steps) * steps


def _apply_count(optimizer):
    """Return the optimizer's count of `apply` calls, updating or not.

    `optimizer.iterations` counts updates, which differs from the calls under
    gradient accumulation; Keras keeps the count of calls in `_iterations`.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return getattr(optimizer, "_iterations", optimizer.iterations)


def _is_first_replica() -> bool:
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return True
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
        raise NotImplementedError(
            "GradWatch supports distribution strategies whose replica id is known "
            "while the train step is traced, such as MirroredStrategy."
        )
    return int(replica_id) == 0


def _sum_over_replicas(tensors):
    """All-reduce (sum) tensors across replicas; unchanged outside a strategy.

    The optimizer receives each replica's own gradients and sums them
    itself; the statistics must describe that sum, so GradWatch sums too.
    This costs one extra all-reduce of the gradients per step under a
    multi-replica strategy.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    present = [i for i, t in enumerate(tensors) if t is not None]
    dense = [tf.convert_to_tensor(tensors[i]) for i in present]
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, dense)
    out = list(tensors)
    for i, tensor in zip(present, reduced):
        out[i] = tensor
    return out


def _unscale(optimizer, grads):
    """Undo the loss scaling that the optimizer applies to the loss."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # The same rule as `LossScaleOptimizer.scale_loss`.
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    elif getattr(optimizer, "loss_scale_factor", None):
        scale = optimizer.loss_scale_factor
    else:
        return grads
    unscaled = []
    for gradient in grads:
        if gradient is None:
            unscaled.append(None)
        elif isinstance(gradient, tf.IndexedSlices):
            unscaled.append(
                tf.IndexedSlices(
                    gradient.values / tf.cast(scale, gradient.values.dtype),
                    gradient.indices,
                    gradient.dense_shape,
                )
            )
        else:
            unscaled.append(gradient / tf.cast(scale, gradient.dtype))
    return unscaled
