"""Tabular sites: a manifest of clinical covariates (`clin_*`) with no `path` column.

The same reader serves the clinical-only baseline of an imaging site (`data.inputs =
"clinical"`): its manifest's clin_* columns, one row per patient (a patient's first
row; every image of a patient carries the same covariates), split by the same patient
hash as its images, so both models are tested on the same patients.

Such a site is recognised from its manifest alone, so a federation of clinical tables
runs through the same ClientApp as an imaging one. One row is one patient. A `split`
column (train / val / test), when present, overrides the hash split of fedir.client.split: it
is how an imported benchmark (fedir data import heart) carries its published split.
Rows with a missing covariate are dropped and counted (FLamby's Fed-Heart-Disease drops
them too); an empty label is an unlabelled patient.

Feature standardisation never pools raw rows: each site sends n, the sum and the sum of
squares of its training features (`FeatureSums`, the records defined here), and the
server combines them into the federation's mean and standard deviation
(fedir.protocol.FeatureSums).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedir.client.manifest import (
    MANIFEST_NAME,
    SPLIT_COLUMN,
    ManifestError,
    manifest_columns,
    parse_float,
    parse_label,
    parse_split,
    parse_target,
    read_records,
    target_columns,
)
from fedir.client.split import SPLITS, split_of
from fedir.tasks import task_of

BINARY_CLASSES = 2  # task.classes' default (fedir.models.NUM_CLASSES), without importing torch here

CLINICAL_PREFIX = "clin_"


def is_tabular_site(site_dir: str | Path) -> bool:
    """clin_* columns and no `path` column: a table of patients, not of images."""
    columns = manifest_columns(site_dir)
    return "path" not in columns and any(c.startswith(CLINICAL_PREFIX) for c in columns)


@dataclass
class TabularSplit:
    """One split: features (n, f) float32, labels (n,) int64 (-1 = unlabelled) or, for a
    task whose target has columns (survival), (n, width) float32 ([time, event]), patients."""

    x: np.ndarray
    y: np.ndarray
    patients: list[str]


@dataclass
class TabularSite:
    """A tabular site: its splits, its feature names and how many rows were dropped."""

    name: str
    features: list[str]
    train: TabularSplit
    val: TabularSplit
    test: TabularSplit
    dropped_missing: int

    def split(self, split: str) -> TabularSplit:
        return getattr(self, split)


def read_tabular_site(
    site_dir: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.25,
    kind: str = "classification", num_classes: int = BINARY_CLASSES,
) -> TabularSite:
    """Read a tabular site's manifest into per-split arrays (see the module docstring);
    the target as task kind `kind` reads it (fedir.tasks), refused rows naming their row;
    a classification label outside 0..num_classes-1 (task.classes) is refused so too."""
    site = Path(site_dir).resolve()
    columns, records = read_records(site, target_columns(kind))
    width = task_of(kind).target_width
    if "patient_id" not in columns:
        # a site whose image column is misnamed too lands here (no `path`): say what is there
        raise ManifestError(f"{site / MANIFEST_NAME}: missing required column patient_id (found: "
                            f"{', '.join(columns)}; an imaging site also needs path)",
                            "missing required column patient_id")
    features = [c for c in columns if c.startswith(CLINICAL_PREFIX)]
    if not features:
        raise ManifestError(f"{site}: a tabular site needs clin_* columns", "a tabular site needs clin_* columns")
    parts: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    dropped = 0
    seen: set[str] = set()
    for rec in records:
        record, where = {k: v.strip() for k, v in rec.cells.items()}, rec.where
        patient = record["patient_id"]
        if not patient:
            raise ManifestError(f"{where}: empty patient_id", f"row {rec.row}: empty patient_id")
        if patient in seen:  # an imaging manifest: one row per image
            continue
        seen.add(patient)
        outcome = parse_target(kind, record, where, rec.row) if width else None  # refused even if dropped below
        values = [parse_float(record[c], c, where, rec.row) for c in features]
        if any(v is None for v in values):
            dropped += 1
            continue
        split = parse_split(record.get(SPLIT_COLUMN, ""), where, rec.row) or split_of(
            patient, val_fraction, test_fraction)
        xs, ys, ps = parts[split]
        xs.append(values)
        if width:
            ys.append(outcome)
        else:
            label = parse_label(record.get("label", ""), where, rec.row, num_classes)
            ys.append(-1 if label is None else label)
        ps.append(patient)
    n_f = len(features)
    splits = {
        s: TabularSplit(
            x=np.asarray(xs, dtype=np.float32).reshape(-1, n_f),
            y=np.asarray(ys, dtype=np.float32).reshape(-1, width) if width else np.asarray(ys, dtype=np.int64),
            patients=ps,
        )
        for s, (xs, ys, ps) in parts.items()
    }
    return TabularSite(site.name, features, splits["train"], splits["val"], splits["test"], dropped)


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32)
