"""`fedir data import heart`: the UCI Heart Disease hospitals as four tabular sites.

Follows FLamby's Fed-Heart-Disease preprocessing (Ogier du Terrail et al. 2022,
flamby/datasets/fed_heart_disease): of the 14 "processed" attributes, columns 10-12
(slope, ca, thal) are dropped; rows with any remaining missing value (`?`) are dropped;
chest-pain type `cp` (levels 1-4) and `restecg` (0-2) are one-hot encoded with the first
level dropped, which leaves 13 features; the label is `num > 0`; each centre is split by
`sklearn.model_selection.train_test_split(train_size=0.66, random_state=43)` on its rows
in file order (Cleveland 199/104, Hungary 172/89, Switzerland 30/16, VA 85/45).

The split is written into the manifest's `split` column, which fedir's tabular reader
uses instead of its patient-hash split, so every run sees FLamby's exact test patients.
One row is one patient (`patient_id` = centre and row number), so the split is by patient.
Where fedir differs from FLamby: the one-hot levels are fixed (not inferred per file), and
features are standardised at training time (fedir.client.inputs), not at import.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from sklearn.model_selection import train_test_split

from fedir.client.manifest import SPLIT_COLUMN
from fedir.errors import MissingData

CENTRES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num")
DROPPED = ("slope", "ca", "thal")
ONE_HOT = {"cp": (2, 3, 4), "restecg": (1, 2)}  # levels kept (first level dropped)
TRAIN_SIZE, RANDOM_STATE = 0.66, 43
DATA_ENV = "FEDIR_DATA"


def default_source() -> Path:
    """`$FEDIR_DATA/uci_heart_disease`, else `../shared/data/uci_heart_disease` from the repo root."""
    base = os.environ.get(DATA_ENV)
    root = Path(base) if base else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return root / "uci_heart_disease"


def feature_row(values: dict[str, float]) -> dict[str, float]:
    """One patient's 13 clin_* features, in FLamby's column order (dummies last)."""
    kept = [c for c in COLUMNS[:-1] if c not in DROPPED and c not in ONE_HOT]
    out = {f"clin_{c}": values[c] for c in kept}
    for column, levels in ONE_HOT.items():
        for level in levels:
            out[f"clin_{column}_{level}"] = 1.0 if values[column] == level else 0.0
    return out


def read_centre(path: Path) -> list[dict[str, float]]:
    """The centre's rows with no missing value in the columns FLamby keeps, in file order."""
    rows = []
    with path.open(newline="") as fh:
        for record in csv.reader(fh):
            if not record:
                continue
            values = dict(zip(COLUMNS, (v.strip() for v in record)))
            if any(values[c] == "?" for c in COLUMNS if c not in DROPPED):
                continue
            rows.append({c: float(values[c]) for c in COLUMNS if c not in DROPPED})
    return rows


def import_heart(out: str | Path, source: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Write OUT/<centre>/manifest.csv for the four centres; return train/test counts."""
    source = Path(source) if source else default_source()
    counts: dict[str, dict[str, int]] = {}
    for centre, filename in CENTRES.items():
        path = source / filename
        if not path.is_file():
            raise MissingData(f"{path}: not found (set --source or ${DATA_ENV})")
        rows = read_centre(path)
        train_idx, _ = train_test_split(list(range(len(rows))), train_size=TRAIN_SIZE,
                                        random_state=RANDOM_STATE)
        train_set = set(train_idx)
        site = Path(out) / centre
        site.mkdir(parents=True, exist_ok=True)
        records = [
            {"patient_id": f"{centre}-{i:03d}", "label": int(r["num"] > 0),
             SPLIT_COLUMN: "train" if i in train_set else "test", **feature_row(r)}
            for i, r in enumerate(rows)
        ]
        with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        counts[centre] = {"train": len(train_set), "test": len(rows) - len(train_set)}
    return counts
