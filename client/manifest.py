"""The site manifest: `manifest.csv`, one row per image (or series), read and written here.

Columns (docs/site-guide.md, "manifest.csv"): `patient_id` (required), `path` (required
for imaging sites, relative to the site folder), `label` (class index, empty = unlabelled), `clin_*` (optional
clinical covariates), `split` (optional: train / val / test; overrides the patient-hash
split, so an imported benchmark keeps its published split), `mask` (optional: a label
image of the row's image, relative to the site folder; empty = no mask) and `mask_frames`
(optional: the 0-based frames of the image that the mask's frames outline, separated by
";"; client/masks.py) and `acquired` (optional: when the row's images were acquired, a date
YYYY-MM-DD, a year YYYY or a quarter YYYY-Qn; it stays at the site, which reports its test
metrics per period, client/drift.py). Errors name the file and the row, because the person reading them
is a hospital IT team looking at a spreadsheet, not at a traceback.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedir.client.split import SPLITS
from fedir.errors import UserError
from fedir.tasks import RowError, task_of

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("patient_id", "path")
SPLIT_COLUMN = "split"
MASK_COLUMN = "mask"
MASK_FRAMES_COLUMN = "mask_frames"
ACQUIRED_COLUMN = "acquired"
_YEAR = re.compile(r"[0-9]{4}")
_QUARTER = re.compile(r"([0-9]{4})-Q([1-4])")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
YEARS = (1900, 2199)  # an `acquired` year outside these is a typo, not a date


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
class Acquired:
    """When a row's images were acquired, at the precision the manifest gives: a year, a
    quarter of a year, or a day (`quarter` is then the day's)."""

    year: int
    quarter: int | None = None  # 1..4; None for a bare year
    day: dt.date | None = None

    @property
    def start(self) -> dt.date:
        """The first day of the interval: what "earliest" compares."""
        return self.day or dt.date(self.year, 3 * (self.quarter or 1) - 2, 1)

    def period(self, unit: str) -> str | None:
        """The period label of `unit` ("year": "2021"; "quarter": "2021-Q3"), or None when the
        manifest gave less than the unit needs (a bare year under "quarter")."""
        if unit == "year":
            return f"{self.year:04d}"
        if unit == "quarter":
            return None if self.quarter is None else f"{self.year:04d}-Q{self.quarter}"
        raise ValueError(f"no period unit {unit!r}: year or quarter")


def parse_acquired(raw: str, where: str, row: int) -> Acquired | None:
    """`acquired`: a date YYYY-MM-DD, a year YYYY or a quarter YYYY-Qn; None when empty."""
    raw = raw.strip()
    if raw == "":
        return None
    value = None
    if _YEAR.fullmatch(raw):
        value = Acquired(int(raw))
    elif quarter := _QUARTER.fullmatch(raw):
        value = Acquired(int(quarter.group(1)), int(quarter.group(2)))
    elif _DATE.fullmatch(raw):
        try:
            day = dt.date.fromisoformat(raw)
            value = Acquired(day.year, (day.month - 1) // 3 + 1, day)
        except ValueError:
            pass  # a day that does not exist (2021-02-30)
    if value is not None and YEARS[0] <= value.year <= YEARS[1]:
        return value
    raise ManifestError(f"{where}: acquired {raw!r} is not a date (YYYY-MM-DD), a year (YYYY) or a quarter (YYYY-Qn) "
                        f"in {YEARS[0]}-{YEARS[1]}",
                        f"row {row}: an acquired value is not a date (YYYY-MM-DD), a year (YYYY) or a quarter (YYYY-Qn) "
                        f"in {YEARS[0]}-{YEARS[1]}")


def acquired_by_patient(site_dir: str | Path) -> dict[str, Acquired]:
    """Each patient's earliest `acquired` value (imaging and tabular sites alike); patients
    without one are absent, and so is everyone when the manifest has no such column.
    ManifestError names the row of a value that is not a date, year or quarter."""
    columns, records = read_records(site_dir)
    out: dict[str, Acquired] = {}
    if ACQUIRED_COLUMN not in columns:
        return out
    for rec in records:
        value = parse_acquired(rec.cells.get(ACQUIRED_COLUMN, ""), rec.where, rec.row)
        patient = rec.cells.get("patient_id", "").strip()
        if value is not None and patient:
            out[patient] = min(value, out.get(patient, value), key=lambda a: a.start)
    return out


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
    mask: Path | None = None  # absolute, inside the site folder; None = no mask
    mask_frames: tuple[int, ...] | None = None  # image frames the mask outlines; None = as the mask says
    acquired: Acquired | None = None  # the `acquired` cell; None = not given


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


def parse_frames(raw: str, where: str, row: int) -> tuple[int, ...] | None:
    """`mask_frames`: distinct 0-based frame indices separated by ";", or None when empty."""
    raw = raw.strip()
    if raw == "":
        return None
    parts = [part.strip() for part in raw.split(";")]
    if not all(part.isdigit() for part in parts) or len(set(parts)) != len(parts):
        raise ManifestError(f"{where}: mask_frames {raw!r} is not a list of distinct frame numbers (0-based, ';'-separated)",
                            f"row {row}: mask_frames is not a list of distinct frame numbers")
    return tuple(int(part) for part in parts)


def _site_path(site: Path, rel: str, column: str, where: str, row: int) -> Path:
    """A manifest cell as a path inside the site folder (symlinks resolved), or ManifestError."""
    try:
        path = (site / rel).resolve()
    except (ValueError, OSError) as exc:
        raise ManifestError(f"{where}: {column} {rel!r} is not usable ({exc})",
                            f"row {row}: a {column} is not usable") from None
    if not path.is_relative_to(site):
        raise ManifestError(f"{where}: {column} {rel!r} points outside the site folder",
                            f"row {row}: a {column} points outside the site folder")
    return path


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
    path listed twice, a label outside 0..num_classes-1 (when given), a path or mask that
    resolves outside the site folder (symlinks included), so that a site can never be
    made to read files it did not export, `mask_frames` that are not distinct frame
    numbers or come without a mask, an `acquired` value that is not a date (YYYY-MM-DD),
    a year or a quarter (YYYY-Qn), or a patient whose rows name different splits (the
    split is by patient: one patient's images in training and test would leak). Under
    `kind = "survival"` every row needs `time` (days, >= 0) and `event` (0/1), refused
    with the row number otherwise (fedir.tasks.survival), and a patient's rows (its images)
    the same ones. A mask file that is missing or
    unusable is not a manifest error: the site reader skips that mask with its reason
    (client/masks.py).
    """
    site = Path(site_dir).resolve()
    columns, records = read_records(site, REQUIRED_COLUMNS + target_columns(kind))
    clin_columns = [c for c in columns if c.startswith("clin_")]
    rows: list[ManifestRow] = []
    seen: dict[Path, int] = {}
    split_of_patient: dict[str, tuple[str | None, int]] = {}  # the first row's split cell
    outcome_of_patient: dict[str, tuple[object, int]] = {}  # the first row's target (survival)
    for rec in records:
        record, number, where = rec.cells, rec.row, rec.where
        patient_id = record["patient_id"].strip()
        rel = record["path"].strip()
        if not patient_id:
            raise ManifestError(f"{where}: empty patient_id", f"row {number}: empty patient_id")
        if not rel:
            raise ManifestError(f"{where}: empty path", f"row {number}: empty path")
        path = _site_path(site, rel, "path", where, number)
        mask_rel = record.get(MASK_COLUMN, "").strip()
        mask = _site_path(site, mask_rel, "mask", where, number) if mask_rel else None
        mask_frames = parse_frames(record.get(MASK_FRAMES_COLUMN, ""), where, number)
        if mask_frames is not None and mask is None:
            raise ManifestError(f"{where}: mask_frames without a mask", f"row {number}: mask_frames without a mask")
        if path in seen:
            raise ManifestError(
                f"{where}: path {rel!r} is listed again (first at row {seen[path]})",
                f"row {number}: a path is listed again (first at row {seen[path]})",
            )
        seen[path] = number
        split = parse_split(record.get(SPLIT_COLUMN, ""), where, number)
        first_split, first_row = split_of_patient.setdefault(patient_id, (split, number))
        if split != first_split:
            # a patient in two splits would put the same anatomy in training and test
            named = f"{split or 'the patient-hash split'} here, {first_split or 'the patient-hash split'} at row {first_row}"
            raise ManifestError(f"{where}: patient {patient_id!r} is in two splits ({named}); "
                                "a patient's images must share one split",
                                f"row {number}: a patient is in two splits ({named})")
        outcome = None if kind == "classification" else parse_target(kind, record, where, number)
        first_outcome, first_row = outcome_of_patient.setdefault(patient_id, (outcome, number))
        if outcome != first_outcome:
            # one patient has one follow-up: its images cannot disagree on it
            raise ManifestError(f"{where}: patient {patient_id!r} has time/event {outcome} here and "
                                f"{first_outcome} at row {first_row}; a patient's rows must share them",
                                f"row {number}: a patient's time/event differ from its row {first_row}")
        rows.append(
            ManifestRow(
                row=number,
                patient_id=patient_id,
                path=path,
                label=parse_label(record.get("label", ""), where, number, num_classes)
                if kind == "classification" else None,
                clinical={c: parse_float(record[c], c, where, number) for c in clin_columns},
                split=split,
                outcome=outcome,
                mask=mask,
                mask_frames=mask_frames,
                acquired=parse_acquired(record.get(ACQUIRED_COLUMN, ""), where, number),
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
