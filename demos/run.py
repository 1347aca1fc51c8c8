"""Train one demo model with GradWatch attached and write its outputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import classification_report

from demos.data import PreparedData
from demos.models import BATCH_SIZE, ModelSpec
from demos.plots import plot_gradient_flow
from keras_gradwatch import GradWatch

FIGURE_FILE = "gradient_flow.png"
METRICS_FILE = "metrics.json"
# Outputs of GradWatch in its log_dir, which is the model's output directory.
# They are removed before a rerun so that two runs never mix.
GRADWATCH_OUTPUTS = ("train", "gradwatch.jsonl", "report.json")


@dataclass
class ModelResult:
    """Final metrics and GradWatch findings of one trained demo model.

    `loss` and `accuracy` are the training metrics of the last epoch run.
    `val_loss` and `val_accuracy` come from `model.evaluate` on the validation
    split after training, so for models with early stopping they describe the
    restored best weights, from epoch `best_epoch` (counted from 1; `None`
    without early stopping).
    """

    number: int
    role: str
    tutorial_result: str
    problem: str | None
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    epochs_run: int
    epochs_requested: int
    best_epoch: int | None
    findings: list[dict] = field(default_factory=list)
    classification_report: str | None = None
    output_dir: str = ""


def train_model(
    spec: ModelSpec,
    data: PreparedData,
    epochs: int,
    seed: int,
    output_dir: Path,
    verbose: int = 2,
) -> ModelResult:
    """Train `spec`'s model with GradWatch and write its report, figure and metrics.

    `output_dir` is GradWatch's `log_dir`, so GradWatch writes its
    `report.json`, its run record `gradwatch.jsonl` and TensorBoard events in
    `train/` there; this function adds `gradient_flow.png` and `metrics.json`.
    GradWatch's outputs from an earlier run are removed first, so that a rerun
    does not mix two runs' event files.

    Args:
        spec: the model to build and train.
        data: the prepared splits. `spec.scaled_inputs` selects the scaled
            or the raw features.
        epochs: maximum number of epochs. Early stopping may end training sooner.
        seed: passed to `keras.utils.set_random_seed` before the model is built.
        output_dir: directory for this model's files. It is created if missing.
        verbose: `verbose` argument of `fit`: 0 silent, 2 one line per epoch.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in GRADWATCH_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    keras.utils.set_random_seed(seed)
    model = spec.build()
    x_train, x_val = data.features(scaled=spec.scaled_inputs)
    y_train = data.y_train.astype(np.float32)
    y_val = data.y_val.astype(np.float32)

    watch = GradWatch(log_dir=str(output_dir), verbose=0, histogram_freq=1)
    early_stopping = spec.callbacks()
    # Models 1 and 3 train without validation data, as in the tutorial. Their
    # validation accuracy is measured with `evaluate` after training.
    validation_data = (x_val, y_val) if spec.early_stopping else None
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        validation_data=validation_data,
        callbacks=[watch, *early_stopping],
        verbose=verbose,
    )

    val_loss, val_accuracy = model.evaluate(x_val, y_val, batch_size=BATCH_SIZE, verbose=0)
    report_text = None
    if spec.early_stopping:
        probabilities = model.predict(x_val, batch_size=BATCH_SIZE, verbose=0)
        predictions = (probabilities[:, 0] > 0.5).astype(int)
        report_text = classification_report(data.y_val, predictions, digits=2)

    best_epoch = None
    if early_stopping:
        # `EarlyStopping` restores the best weights whether or not it stopped
        # training. Its `best_epoch` counts from 0, Keras's progress lines from 1.
        best_epoch = early_stopping[0].best_epoch + 1

    report = watch.report()
    result = ModelResult(
        number=spec.number,
        role=spec.role,
        tutorial_result=spec.tutorial_result,
        problem=spec.problem,
        loss=float(history.history["loss"][-1]),
        accuracy=float(history.history["accuracy"][-1]),
        val_loss=float(val_loss),
        val_accuracy=float(val_accuracy),
        epochs_run=len(history.history["loss"]),
        epochs_requested=epochs,
        best_epoch=best_epoch,
        findings=list(report.get("findings", [])),
        classification_report=report_text,
        output_dir=str(output_dir),
    )

    plot_gradient_flow(
        watch.to_dataframe(level="layer"),
        output_dir / FIGURE_FILE,
        title=f"Model {spec.number} ({spec.role}): gradient flow, seed {seed}",
    )
    metrics = {key: value for key, value in asdict(result).items() if key != "findings"}
    metrics["seed"] = seed
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return result
