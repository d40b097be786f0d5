"""The data card: what a site may share about its data, computed at the site.

A card holds counts only: files listed, loaded and skipped (by reason), patients and
images per split, labelled patients per class with the prevalence, and acquisition
metadata as patient counts per value: Modality, Manufacturer, ManufacturerModelName,
PhotometricInterpretation, BitsStored, a pixel-spacing bin and a frames-per-file bin; and
the masks (client/masks.py): rows that list one, runs (files) and frames with a usable
mask, patients with one, skipped masks by reason, all-background frames, and patients per
foreground-fraction bin (the share of an outlined frame's pixels that are not background).
`foreground_counts` is the same kind of table per foreground class, over a segmentation
site's training patients, for the server's foreground-by-site test (fedir.protocol.ForegroundCounts).

Privacy rules, because the card leaves the hospital (sent in the first round, stored in
runs.sqlite, shown in the report):
- only the header tags named above are read, so no name, identifier, UID, date or free
  text can enter a card, and no pixel is ever read here but a mask's, which enters only as
  a foreground-fraction bin;
- every category cell counts patients (a patient with many images counts once) and a
  cell below k (default 5) is suppressed; when a table has exactly one suppressed cell,
  the next smallest is suppressed too, so the table's total cannot give it back;
- values are cut to 64 printable characters (a model name is short; anything longer is
  not a model name).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from flwr.app import ConfigRecord, Context
from pydicom.dataset import Dataset

from fedir.client.imaging import DICOM_SUFFIXES, NUMPY_SUFFIXES, PILLOW_SUFFIXES
from fedir.client.manifest import ManifestRow, read_manifest
from fedir.client.masks import MaskSummary
from fedir.client.site import SiteData
from fedir.client.split import SPLITS, split_of
from fedir.config import Settings
from fedir.models import NUM_CLASSES
from fedir.protocol import SUPPRESSED, ForegroundCounts
from fedir.tasks.segmentation_metrics import FOREGROUND, FOREGROUND_BIN_NAMES, foreground_bin

CARD_VERSION = 2  # 2: masks
DEFAULT_K = 5
HEADER_TAGS = ("Modality", "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation",
               "BitsStored")
_READ_TAGS = [*HEADER_TAGS, "NumberOfFrames", "PixelSpacing", "ImagerPixelSpacing",
              "SharedFunctionalGroupsSequence"]
# Upper bounds (mm) of the pixel-spacing bins; interventional detectors sit at 0.1-0.4 mm.
_SPACING_EDGES = (0.15, 0.3, 0.5, 1.0)
_FRAME_BINS = ((1, "1"), (9, "2-9"), (49, "10-49"), (99, "50-99"))
_MAX_VALUE_LENGTH = 64
UNKNOWN = "unknown"
_SENT_KEY = "fedir-data-card-sent"


@dataclass(frozen=True)
class ImageOutcome:
    """One manifest row after reading: loaded with its acquisition categories
    (`acquisition_of`), or skipped with a SkipReason value."""

    row: ManifestRow
    skipped_reason: str | None = None
    acquisition: Mapping[str, str] = field(default_factory=dict)
    mask: MaskSummary | None = None  # the row's usable mask
    mask_reason: str | None = None  # a MaskSkipReason value when the row's mask was skipped

    @classmethod
    def of(cls, row: ManifestRow, skipped_reason: str | None, mask: MaskSummary | None = None,
           mask_reason: str | None = None) -> ImageOutcome:
        """The outcome of a row, reading its header when it loaded."""
        if skipped_reason is not None:
            return cls(row, skipped_reason)
        try:
            acquisition = acquisition_of(row.path)
        except Exception:  # noqa: BLE001 - a card must never fail a round; pydicom raises many types
            acquisition = {**_non_dicom("unreadable header"), "frames per file": UNKNOWN}
        return cls(row, None, acquisition, mask, mask_reason)


def acquisition_of(path: Path) -> dict[str, str]:
    """The card's categories for one loaded image: header tags as text, spacing and
    frames as bins. A series folder is described by its first file, with its slice count
    as frames; a PNG/NPY file has format-only categories."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        described = acquisition_of(files[0]) if files else _non_dicom("series")
        return {**described, "frames per file": _frames_bin(len(files))}
    suffix = path.suffix.lower()
    if suffix in PILLOW_SUFFIXES or suffix in NUMPY_SUFFIXES or suffix not in DICOM_SUFFIXES and not _is_dicom(path):
        return _non_dicom(suffix.lstrip(".").upper() or "file")
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_READ_TAGS)
    out = {tag: _clean(ds.get(tag)) for tag in HEADER_TAGS}
    out["pixel spacing"] = _spacing_bin(_spacing_of(ds))
    out["frames per file"] = _frames_bin(int(ds.get("NumberOfFrames") or 1))
    return out


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def _non_dicom(fmt: str) -> dict[str, str]:
    return {**{tag: UNKNOWN for tag in HEADER_TAGS}, "Modality": f"none ({fmt})",
            "pixel spacing": UNKNOWN, "frames per file": "1"}


def _clean(value: object) -> str:
    """A header value as a short printable category; absent or empty is 'unknown'."""
    if value is None:
        return UNKNOWN
    text = re.sub(r"\s+", " ", re.sub(r"[^\x20-\x7e]", "", str(value))).strip()
    return text[:_MAX_VALUE_LENGTH] or UNKNOWN


def _spacing_of(ds: Dataset) -> float | None:
    """Row spacing in mm: PixelSpacing, else ImagerPixelSpacing (projection X-ray), else
    the shared Pixel Measures of an Enhanced multi-frame file."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(tag):
            return float(ds.get(tag)[0])
    shared = ds.get("SharedFunctionalGroupsSequence")
    measures = shared[0].get("PixelMeasuresSequence") if shared else None
    if measures and measures[0].get("PixelSpacing"):
        return float(measures[0].PixelSpacing[0])
    return None


def _spacing_bin(spacing: float | None) -> str:
    if spacing is None or not math.isfinite(spacing) or spacing <= 0:
        return UNKNOWN
    low = 0.0
    for edge in _SPACING_EDGES:
        if spacing < edge:
            return f"{low:g}-{edge:g} mm"
        low = edge
    return f">={low:g} mm"


def _frames_bin(frames: int) -> str:
    for top, label in _FRAME_BINS:
        if frames <= top:
            return label
    return "100+"


def _foreground_bin(fraction: float) -> str:
    """The card's name of a foreground-fraction bin (fedir.tasks.segmentation_metrics' bins)."""
    index = foreground_bin(fraction)
    return "0 (all background)" if index == 0 else FOREGROUND_BIN_NAMES[index]


def _mask_table(outcomes: list[ImageOutcome], k: int) -> dict:
    """The card's masks: totals (not suppressed, like the image counts per split) and the
    foreground-fraction bins as patients per bin (suppressed like any category)."""
    skipped: dict[str, int] = defaultdict(int)
    bins: dict[str, set[str]] = defaultdict(set)
    patients: set[str] = set()
    runs = frames = empty = 0
    for outcome in outcomes:
        if outcome.skipped_reason is not None:
            continue
        if outcome.mask_reason is not None:
            skipped[outcome.mask_reason] += 1
        summary = outcome.mask
        if summary is None or not summary.frames:
            continue
        runs += 1
        frames += summary.frames
        empty += summary.all_background
        patients.add(outcome.row.patient_id)
        for fraction in summary.foreground:
            bins[_foreground_bin(fraction)].add(outcome.row.patient_id)
    return {
        "listed": sum(o.row.mask is not None for o in outcomes),
        "runs_with_masks": runs,
        "frames_with_masks": frames,
        "patients_with_masks": len(patients),
        "all_background_frames": empty,
        "skipped": dict(sorted(skipped.items())),
        "foreground_fraction": suppress({b: len(p) for b, p in bins.items()}, k),
    }


def suppress(cells: Mapping[str, int], k: int) -> dict[str, object]:
    """A table of counts with every cell below k removed (and, when exactly one is, the
    next smallest too): `{"values": {...}, "suppressed_cells": n}`."""
    small = {name for name, count in cells.items() if count < k}
    if len(small) == 1 and len(cells) > 1:
        rest = sorted((count, name) for name, count in cells.items() if name not in small)
        small.add(rest[0][1])
    values = {name: int(count) for name, count in sorted(cells.items()) if name not in small}
    return {"values": values, "suppressed_cells": len(small)}


def foreground_counts(labels: np.ndarray, patients: Sequence[str], k: int = DEFAULT_K) -> ForegroundCounts:
    """A segmentation site's training patients per foreground-fraction bin, per foreground
    class, small cells suppressed (fedir.protocol.ForegroundCounts).

    Args:
        labels: (N, ...) label maps of the masked training images (0 background, then the
            classes of FOREGROUND, in the model's input size).
        patients: (N,) the patient of each image; a patient counts once per class, in the
            bin of the mean fraction of that class's pixels over their images.
        k: cells below k are sent as SUPPRESSED (the card's `suppress` rule).
    """
    labels = np.asarray(labels)
    if len(labels) != len(patients):
        raise ValueError(f"{len(labels)} label maps for {len(patients)} patients")
    who = np.asarray(list(patients), dtype=object)
    people = sorted(set(patients))
    rows = []
    for cls in FOREGROUND:
        share = (labels == cls).reshape(len(labels), -1).mean(axis=1) if len(labels) else np.zeros(0)
        bins = Counter(foreground_bin(float(share[who == p].mean())) for p in people)
        shown = cast(dict[str, int], suppress({FOREGROUND_BIN_NAMES[b]: n for b, n in bins.items()}, k)["values"])
        rows.append(tuple(0 if b not in bins else shown.get(name, SUPPRESSED)
                          for b, name in enumerate(FOREGROUND_BIN_NAMES)))
    return ForegroundCounts(len(people), k, tuple(rows))


def build_card(
    outcomes: Iterable[ImageOutcome],
    *,
    val_fraction: float,
    test_fraction: float,
    k: int = DEFAULT_K,
    num_classes: int = NUM_CLASSES,
) -> dict:
    """The card of one site from its rows' outcomes (see the module docstring)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    outcomes = list(outcomes)
    skipped: dict[str, int] = defaultdict(int)
    split_patients: dict[str, set[str]] = {s: set() for s in SPLITS}
    split_images: dict[str, int] = {s: 0 for s in SPLITS}
    class_patients: dict[int, set[str]] = {c: set() for c in range(num_classes)}
    unlabelled: set[str] = set()
    categories: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for outcome in outcomes:
        row = outcome.row
        if outcome.skipped_reason is not None:
            skipped[outcome.skipped_reason] += 1
            continue
        split = row.split or split_of(row.patient_id, val_fraction, test_fraction)
        split_patients[split].add(row.patient_id)
        split_images[split] += 1
        (unlabelled if row.label is None else class_patients[row.label]).add(row.patient_id)
        for name, value in outcome.acquisition.items():
            categories[name][value].add(row.patient_id)
    per_class = {str(c): len(p) for c, p in class_patients.items()}
    labelled = sum(per_class.values())
    labels = suppress(per_class, k)
    positives = labels["values"].get("1") if num_classes == 2 else None
    return {
        "card_version": CARD_VERSION,
        "k": k,
        "files": {"listed": len(outcomes), "loaded": sum(split_images.values()),
                  "skipped": dict(sorted(skipped.items()))},
        "patients": {s: len(split_patients[s]) for s in SPLITS},
        "images": split_images,
        "labels": {
            "labelled_patients": labelled,
            "unlabelled_patients": len(unlabelled - set().union(*class_patients.values())),
            "per_class": labels,
            "prevalence": None if positives is None or not labelled else round(positives / labelled, 3),
        },
        "acquisition": {name: suppress({v: len(p) for v, p in values.items()}, k)
                        for name, values in sorted(categories.items())},
        "masks": _mask_table(outcomes, k),
    }


def card_once(context: Context, site: SiteData, settings: Settings, k: int = DEFAULT_K) -> dict | None:
    """The site's card for this node's first reply of the run, None afterwards: the flag
    lives in `context.state`, which Flower keeps per node for the run (module globals do
    not survive in deployment, where every message runs in a fresh process)."""
    if _SENT_KEY in context.state:
        return None
    skipped = {entry.path: entry.reason for entry in site.skipped}

    def relative(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(site.root).as_posix()

    outcomes = [
        ImageOutcome.of(row, skipped.get(relative(row.path) or ""), site.mask_summaries.get(relative(row.path) or ""),
                        skipped.get(relative(row.mask) or "") if row.mask is not None else None)
        for row in read_manifest(site.root, settings.task_classes)
    ]
    card = build_card(outcomes, val_fraction=settings.data_val_fraction,
                      test_fraction=settings.data_test_fraction, k=k, num_classes=settings.task_classes)
    context.state[_SENT_KEY] = ConfigRecord({"sent": 1})
    return card
