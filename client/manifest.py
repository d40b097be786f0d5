"""The site manifest: `manifest.csv`, one row per image (or series), read and written here.

Columns (docs/site-guide.md, "manifest.csv"): `patient_id` (required), `path` (required
for imaging sites, relative to the site folder), `label` (class index, empty = unlabelled), `clin_*` (optional
clinical covariates), `split` (optional: train / val / test; overrides the patient-hash
split, so an imported benchmark keeps its published split). Errors name the file and the row, because the person reading them
is a hospital IT team looking at a spreadsheet, not at a traceback.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fedir.client.split import SPLITS
from fedir.errors import UserError
from fedir.tasks import RowError, task_of

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("patient_id", "path")
SPLIT_COLUMN = "split"


class ManifestError(UserError, ValueError):
    """The manifest cannot be used; the message names the file and, where known, the row.

    `public` says the same without a path, a patient identifier or a cell's value: it is
    what a ClientApp may send to the server, because folder and file names of a hospital
    export can carry patient names. The full message stays at the site.
    """

    def __init__(self, message: str, public: str) -> None:
        super().__init__(message)
        self.public = f"manifest.csv: {public}"


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row, validated. `row` is the 1-based line number in the CSV file."""

    row: int
    patient_id: str
    path: Path  # absolute, inside the site folder
    label: int | None
    clinical: dict[str, float | None] = field(default_factory=dict)
    split: str | None = None  # the manifest's `split` cell; None = the patient-hash split
    outcome: tuple[float, float] | None = None  # task.kind = survival: (time in days, event 0/1)


def parse_label(raw: str, where: str, row: int, num_classes: int | None) -> int | None:
    """A class index in 0..num_classes-1 (any non-negative one when num_classes is None)."""
    return parse_target("classification", {"label": raw}, where, row, num_classes)


def parse_target(kind: str, cells: dict[str, str], where: str, row: int, num_classes: int | None = None):
    """One row's target as task kind `kind` reads it (fedir.tasks: a class index or None for
    classification, (time, event) for survival); a refused cell is a ManifestError naming the row."""
    try:
        return task_of(kind).parse_target(cells, num_classes)
    except RowError as exc:
        raise ManifestError(f"{where}: {exc}", f"row {row}: {exc.public}") from None


def parse_split(raw: str, where: str, row: int) -> str | None:
    """An explicit split (train / val / test) or None for an empty or absent cell."""
    raw = raw.strip()
    if raw == "":
        return None
    if raw not in SPLITS:
        raise ManifestError(f"{where}: split {raw!r} is not one of {', '.join(SPLITS)}",
                            f"row {row}: a split is not one of {', '.join(SPLITS)}")
    return raw


def parse_float(raw: str, column: str, where: str, row: int) -> float | None:
    raw = raw.strip()
    if raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ManifestError(f"{where}: {column} {raw!r} is not a number",
                            f"row {row}: a {column} value is not a number") from None


@dataclass(frozen=True)
class ManifestRecord:
    """One CSV record with stripped column names; `row` is the line a spreadsheet shows."""

    row: int
    cells: dict[str, str]
    where: str  # "<manifest>, row N": the site-side prefix of an error message


def manifest_columns(site_dir: str | Path) -> list[str]:
    """The header of a site's manifest (stripped), or [] when there is none or it is unreadable."""
    try:
        columns, _ = read_records(site_dir)
    except ManifestError:
        return []
    return columns


def read_records(site_dir: str | Path, required: tuple[str, ...] = ()) -> tuple[list[str], list[ManifestRecord]]:
    """The one reader of `site_dir/manifest.csv`: its columns and its records.

    Raises ManifestError for a missing folder or file, text that is not UTF-8, a
    malformed CSV line or a missing `required` column. Imaging and tabular sites, the
    data check and the clinical companion all read the manifest through here, so a
    file is judged the same way everywhere.
    """
    site = Path(site_dir).resolve()
    manifest = site / MANIFEST_NAME
    if not site.is_dir():
        raise ManifestError(f"{site}: not a folder", "the site folder does not exist")
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no manifest.csv in the site folder",
                            "no manifest.csv in the site folder")
    raw = manifest.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{manifest}, row {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8",
            f"row {line}: not UTF-8 text",
        ) from None
    reader = csv.DictReader(text.splitlines())
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(
                f"{manifest}: missing required column(s) {', '.join(missing)} "
                f"(found: {', '.join(columns) or 'none'})",
                f"missing required column(s) {', '.join(missing)}",
            )
        records = []
        for record in reader:
            # The CSV line the record ends on: right even after blank lines, which the
            # reader skips, so the message points at the line a spreadsheet shows.
            number = reader.line_num
            cells = {(k or "").strip(): (v or "") for k, v in record.items()}
            records.append(ManifestRecord(number, cells, f"{manifest}, row {number}"))
    except csv.Error as exc:
        raise ManifestError(f"{manifest}, row {reader.line_num}: malformed CSV ({exc})",
                            f"row {reader.line_num}: malformed CSV") from None
    return columns, records


def read_manifest(site_dir: str | Path, num_classes: int | None = None,
                  kind: str = "classification") -> list[ManifestRow]:
    """Read and validate an imaging site's `site_dir/manifest.csv`.

    Raises ManifestError for what `read_records` refuses, an empty patient_id or path, a
    path listed twice, a label outside 0..num_classes-1 (when given), or a path that
    resolves outside the site folder (symlinks included), so that a site can never be
    made to read files it did not export. Under `kind = "survival"` every row needs `time`
    (days, >= 0) and `event` (0/1), refused with the row number otherwise (fedir.tasks.survival).
    """
    site = Path(site_dir).resolve()
    columns, records = read_records(site, REQUIRED_COLUMNS + target_columns(kind))
    clin_columns = [c for c in columns if c.startswith("clin_")]
    rows: list[ManifestRow] = []
    seen: dict[Path, int] = {}
    for rec in records:
        record, number, where = rec.cells, rec.row, rec.where
        patient_id = record["patient_id"].strip()
        rel = record["path"].strip()
        if not patient_id:
            raise ManifestError(f"{where}: empty patient_id", f"row {number}: empty patient_id")
        if not rel:
            raise ManifestError(f"{where}: empty path", f"row {number}: empty path")
        try:
            path = (site / rel).resolve()
        except (ValueError, OSError) as exc:
            raise ManifestError(f"{where}: path {rel!r} is not usable ({exc})",
                                f"row {number}: a path is not usable") from None
        if not path.is_relative_to(site):
            raise ManifestError(f"{where}: path {rel!r} points outside the site folder",
                                f"row {number}: a path points outside the site folder")
        if path in seen:
            raise ManifestError(
                f"{where}: path {rel!r} is listed again (first at row {seen[path]})",
                f"row {number}: a path is listed again (first at row {seen[path]})",
            )
        seen[path] = number
        rows.append(
            ManifestRow(
                row=number,
                patient_id=patient_id,
                path=path,
                label=parse_label(record.get("label", ""), where, number, num_classes)
                if kind == "classification" else None,
                clinical={c: parse_float(record[c], c, where, number) for c in clin_columns},
                split=parse_split(record.get(SPLIT_COLUMN, ""), where, number),
                outcome=None if kind == "classification" else parse_target(kind, record, where, number),
            )
        )
    return rows


def target_columns(kind: str) -> tuple[str, ...]:
    """The columns a manifest must have for task kind `kind` (classification: none, an
    absent `label` column is an unlabelled site; survival: `time` and `event`)."""
    return () if kind == "classification" else tuple(task_of(kind).TARGET_COLUMNS)


def write_manifest(site_dir: str | Path, rows: list[dict[str, object]]) -> Path:
    """Write rows (dicts with at least patient_id and path) as `site_dir/manifest.csv`."""
    site = Path(site_dir)
    columns: list[str] = list(REQUIRED_COLUMNS) + ["label"]
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    out = site / MANIFEST_NAME
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return out
