"""`fedir data import tcga-brca`: FLamby's Fed-TCGA-BRCA as six tabular survival sites.

Source: `brca.csv` (one row per patient: `pid`, 39 covariates, then `E` = event and `T` =
time in days; FLamby's metric code, not its README, fixes that order: column 40 is E, 41
is T) and `train_test_split.csv` (FLamby's static split: `fold2` = `train_K` / `test_K`,
K the region 0-5 of the patient's tissue source site; the 8 patients of brca.csv from
region "Other" have no fold and are left out, as FLamby does: 1,088 patients remain). Each region becomes a site folder
with a manifest of `patient_id`, `split` (FLamby's train/test, kept by fedir's tabular
reader instead of its hash split), `time`, `event` and the covariates as `clin_*`
columns in FLamby's order (names made CSV- and identifier-safe). Covariates are written as
they are (FLamby does not standardise them either; fedir standardises at training time,
fedir.client.inputs). One row is one patient, so the split is by patient.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from fedir.client.manifest import SPLIT_COLUMN
from fedir.errors import MissingData

REGIONS = ("northeast", "south", "west", "midwest", "europe", "canada")  # FLamby's centers 0-5
DATA_ENV = "FEDIR_DATA"
N_COVARIATES = 39


def default_source() -> Path:
    """`$FEDIR_DATA/fed_tcga_brca`, else `../shared/data/fed_tcga_brca` from the repo root."""
    base = os.environ.get(DATA_ENV)
    root = Path(base) if base else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return root / "fed_tcga_brca"


def clinical_name(column: str) -> str:
    """`ajcc_pathologic_n_N0 (i-)` -> `clin_ajcc_pathologic_n_n0_i`."""
    return "clin_" + re.sub(r"[^0-9a-z]+", "_", column.lower()).strip("_")


def import_tcga_brca(out: str | Path, source: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Write OUT/<region>/manifest.csv for the six regions; return train/test/event counts."""
    source = Path(source) if source else default_source()
    data, split_file = source / "brca.csv", source / "train_test_split.csv"
    for path in (data, split_file):
        if not path.is_file():
            raise MissingData(f"{path}: not found (set --source or ${DATA_ENV})")
    with split_file.open(newline="") as fh:
        folds = {row["pid"]: row["fold2"] for row in csv.DictReader(fh)}
    with data.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    covariates = header[1:1 + N_COVARIATES]
    if header[1 + N_COVARIATES:] != ["E", "T"]:
        raise MissingData(f"{data}: expected pid, {N_COVARIATES} covariates, E, T; found {len(header)} columns")
    names = [clinical_name(c) for c in covariates]
    if len(set(names)) != len(names):
        raise MissingData(f"{data}: covariate names collide once made identifier-safe")
    sites: dict[str, list[dict[str, object]]] = {r: [] for r in REGIONS}
    for row in rows:
        pid = row[0]
        if pid not in folds:  # FLamby leaves out the tissue source sites of region "Other"
            continue
        split, region = folds[pid].split("_")
        record: dict[str, object] = {"patient_id": pid, SPLIT_COLUMN: split,
                                     "time": row[2 + N_COVARIATES], "event": int(float(row[1 + N_COVARIATES]))}
        record.update(zip(names, row[1:1 + N_COVARIATES]))
        sites[REGIONS[int(region)]].append(record)
    counts = {}
    for region, records in sites.items():
        site = Path(out) / region
        site.mkdir(parents=True, exist_ok=True)
        with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["patient_id", SPLIT_COLUMN, "time", "event", *names])
            writer.writeheader()
            writer.writerows(records)
        counts[region] = {"train": sum(r[SPLIT_COLUMN] == "train" for r in records),
                          "test": sum(r[SPLIT_COLUMN] == "test" for r in records),
                          "events": sum(int(r["event"]) for r in records)}  # type: ignore[call-overload]
    return counts
