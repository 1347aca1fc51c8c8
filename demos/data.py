"""Load and prepare the credit-card approval data for the demos.

The data is the public Kaggle dataset "Credit card details Binary classification"
(kaggle.com/datasets/rohitudageri/credit-card-details): `Credit_card.csv` with
1,548 applicants and `Credit_card_label.csv` with their labels, joined on
`Ind_ID`. The preparation follows the tutorial experiment that the demos
reproduce:

1. Join the two files on `Ind_ID`; the target is `label` as int (1 = approved).
2. Derive `Age = -Birthday_count // 365`, `EmployedDaysOnly` (positive
   `Employed_days`, else 0) and `UnemployedDaysOnly` (`abs(Employed_days)` where
   it is negative, else 0).
3. Use 12 categorical columns (pandas `Categorical`) and 6 continuous ones, and
   fill missing values with each column's mode.
4. Balance the classes with `RandomOverSampler` (1,373 rows each, 2,746 rows),
   then split with `train_test_split(test_size=0.25)` into 2,059 training and
   687 validation rows.
5. Replace categories with their integer codes (`.cat.codes`).
6. Fit a `StandardScaler` on the training split for the models that take
   scaled inputs; the others take the raw features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from imblearn.over_sampling import RandomOverSampler
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

DATA_ENV_VAR = "GRADWATCH_DATA"
FEATURES_FILE = "Credit_card.csv"
LABELS_FILE = "Credit_card_label.csv"
ID_COLUMN = "Ind_ID"
TARGET_COLUMN = "label"

CATEGORICAL_COLUMNS = (
    "GENDER",
    "Car_Owner",
    "Propert_Owner",
    "Type_Income",
    "EDUCATION",
    "Marital_status",
    "Housing_type",
    "Mobile_phone",
    "Work_Phone",
    "Phone",
    "Type_Occupation",
    "EMAIL_ID",
)
CONTINUOUS_COLUMNS = (
    "CHILDREN",
    "Family_Members",
    "Annual_income",
    "Age",
    "EmployedDaysOnly",
    "UnemployedDaysOnly",
)
FEATURE_COLUMNS = CATEGORICAL_COLUMNS + CONTINUOUS_COLUMNS

# Columns of the raw files that the preparation reads. `Age`, `EmployedDaysOnly`
# and `UnemployedDaysOnly` are derived from `Birthday_count` and `Employed_days`.
_DERIVED_COLUMNS = ("Age", "EmployedDaysOnly", "UnemployedDaysOnly")
REQUIRED_FEATURE_FILE_COLUMNS = (
    (ID_COLUMN,)
    + tuple(c for c in FEATURE_COLUMNS if c not in _DERIVED_COLUMNS)
    + ("Birthday_count", "Employed_days")
)
REQUIRED_LABEL_FILE_COLUMNS = (ID_COLUMN, TARGET_COLUMN)

TEST_SIZE = 0.25

DATASET_HELP = (
    'The demos use the public Kaggle dataset "Credit card details Binary '
    'classification" (kaggle.com/datasets/rohitudageri/credit-card-details). '
    f"Download {FEATURES_FILE} and {LABELS_FILE} into one directory and pass "
    f"--data DIR or set the {DATA_ENV_VAR} environment variable to it."
)


class DataError(ValueError):
    """Error raised when the data directory, one of its files or a column is missing."""


@dataclass(frozen=True)
class PreparedData:
    """Training and validation splits of the balanced credit-card data.

    `x_train` and `x_val` hold the raw features (category codes and unscaled
    continuous values) in `FEATURE_COLUMNS` order. `x_train_scaled` and
    `x_val_scaled` are the same rows after a `StandardScaler` fitted on the
    training split. Labels are 0/1 integers.
    """

    x_train: pd.DataFrame
    x_val: pd.DataFrame
    y_train: np.ndarray
    y_val: np.ndarray
    x_train_scaled: np.ndarray
    x_val_scaled: np.ndarray
    balanced_rows: int
    seed: int

    def features(self, scaled: bool) -> tuple[np.ndarray, np.ndarray]:
        """Return `(x_train, x_val)` as float32 arrays, scaled or raw."""
        if scaled:
            return self.x_train_scaled, self.x_val_scaled
        return (
            self.x_train.to_numpy(dtype=np.float32),
            self.x_val.to_numpy(dtype=np.float32),
        )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Return the data directory from the argument, else from `GRADWATCH_DATA`.

    Raises:
        DataError: neither is set, or the directory does not exist.
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_ENV_VAR) or None
    if data_dir is None:
        raise DataError(f"No data directory given. {DATASET_HELP}")

    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"Data directory not found: {path}. {DATASET_HELP}")
    return path


def _read_csv(path: Path, required_columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"Data file not found: {path}. {DATASET_HELP}")

    frame = pd.read_csv(path)
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise DataError(
            f"Data file {path} is missing column(s) {', '.join(missing)}. {DATASET_HELP}"
        )
    return frame


def load_raw(data_dir: str | os.PathLike[str] | None) -> pd.DataFrame:
    """Read both CSV files and join them on `Ind_ID`.

    Args:
        data_dir: directory containing `Credit_card.csv` and
            `Credit_card_label.csv`. `None` reads `GRADWATCH_DATA`.

    Raises:
        DataError: the directory, a file or a required column is missing.
    """
    directory = resolve_data_dir(data_dir)
    features = _read_csv(directory / FEATURES_FILE, REQUIRED_FEATURE_FILE_COLUMNS)
    labels = _read_csv(directory / LABELS_FILE, REQUIRED_LABEL_FILE_COLUMNS)
    return features.merge(labels, on=ID_COLUMN, how="inner")


def build_features(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Derive the 18 feature columns and the integer target from the joined data.

    Categorical columns come back as pandas `Categorical`. Missing values in
    every feature column are filled with that column's mode.
    """
    frame = raw.copy()
    frame["Age"] = -frame["Birthday_count"] // 365
    employed_days = frame["Employed_days"]
    frame["EmployedDaysOnly"] = employed_days.where(employed_days > 0, 0)
    frame["UnemployedDaysOnly"] = employed_days.abs().where(employed_days < 0, 0)

    features = frame[list(FEATURE_COLUMNS)].copy()
    for column in CATEGORICAL_COLUMNS:
        features[column] = pd.Categorical(features[column])
    for column in FEATURE_COLUMNS:
        if features[column].isna().any():
            features[column] = features[column].fillna(features[column].mode()[0])

    target = frame[TARGET_COLUMN].astype(int)
    return features, target


def prepare(data_dir: str | os.PathLike[str] | None, seed: int = 0) -> PreparedData:
    """Load, balance, split, encode and scale the credit-card data.

    Args:
        data_dir: directory containing `Credit_card.csv` and
            `Credit_card_label.csv`. `None` reads `GRADWATCH_DATA`.
        seed: `random_state` of the oversampler and of the split.

    Raises:
        DataError: the directory, a file or a required column is missing.
    """
    features, target = build_features(load_raw(data_dir))

    sampler = RandomOverSampler(random_state=seed)
    balanced_x, balanced_y = sampler.fit_resample(features, target)

    x_train, x_val, y_train, y_val = train_test_split(
        balanced_x, balanced_y, test_size=TEST_SIZE, random_state=seed
    )
    x_train = _encode_categories(x_train)
    x_val = _encode_categories(x_val)

    scaler = StandardScaler().fit(x_train.to_numpy(dtype=np.float64))
    x_train_scaled = scaler.transform(x_train.to_numpy(dtype=np.float64))
    x_val_scaled = scaler.transform(x_val.to_numpy(dtype=np.float64))

    return PreparedData(
        x_train=x_train,
        x_val=x_val,
        y_train=np.asarray(y_train, dtype=np.int64),
        y_val=np.asarray(y_val, dtype=np.int64),
        x_train_scaled=x_train_scaled.astype(np.float32),
        x_val_scaled=x_val_scaled.astype(np.float32),
        balanced_rows=len(balanced_x),
        seed=seed,
    )


def _encode_categories(frame: pd.DataFrame) -> pd.DataFrame:
    encoded = frame.copy()
    for column in CATEGORICAL_COLUMNS:
        encoded[column] = encoded[column].cat.codes
    return encoded.reset_index(drop=True)
