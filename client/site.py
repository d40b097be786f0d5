"""A site folder -> decoded image tensors per split, cached on the site's own disk.

Decoding DICOM costs far more than a training step (docs/design.md, "Performance notes"), and
in deployment every Flower message runs in a fresh process, so the decoded site is
cached as one file in the site folder and every round after the first reads that file.
Unreadable images are skipped and listed with their reason: a bad file never stops a
round. A broken manifest (ManifestError) does, because that is the site's configuration.
A row's mask (client/masks.py) is decoded and cached with its image; an unusable mask is
skipped and listed the same way (its reason starts with "mask:"), and its image stays, unlabelled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedir.client.imaging import UnreadableImage, load_image, spatial_dims_of
from fedir.client.manifest import MANIFEST_NAME, ManifestRow, read_manifest
from fedir.client.masks import MaskSummary, load_labelled_image
from fedir.client.split import SPLITS, split_of
from fedir.models import NUM_CLASSES

LOG = logging.getLogger(__name__)
CACHE_DIR_NAME = ".fedir-cache"
# Bump when decoding or preprocessing changes, so that old caches are not reused.
CACHE_VERSION = 2  # 2: masks


class SiteUnusable(RuntimeError):
    """A site that cannot take part (its manifest is invalid). The message is the
    ManifestError's path-free `public` text: Flower sends a failed ClientApp's message to
    the server, which records the site as missing with it; the full one is logged here."""


@dataclass
class SplitTensors:
    """The images of one split with their labels (-1 = unlabelled) and patients."""

    images: torch.Tensor  # (N, 1, S, S) float32; (N, 1, S, S, S) under the "volume" policy
    labels: torch.Tensor  # (N,) int64
    patients: list[str]
    # Segmentation labels (client/masks.py) of the M outlined images: (M, 1, S, S) uint8
    # (or (M, 1, S, S, S)), and per image its row in `masks`, -1 when it has none. None
    # when the split was built without them (a subset made by a caller).
    masks: torch.Tensor | None = None
    mask_of: torch.Tensor | None = None  # (N,) int64

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def mask_count(self) -> int:
        """Images of this split with a mask."""
        return 0 if self.mask_of is None else int((self.mask_of >= 0).sum())


@dataclass
class SkippedFile:
    """An image, or a mask, the site could not use; `path` is relative to the site folder."""

    path: str
    reason: str  # a SkipReason value
    detail: str


@dataclass
class SiteData:
    """A whole site, decoded: the three splits, the skipped files, the clinical columns."""

    name: str
    root: Path
    train: SplitTensors
    val: SplitTensors
    test: SplitTensors
    skipped: list[SkippedFile]
    clinical_columns: list[str]
    # Per image path (relative) with a usable mask: its outlined frames and their foreground
    # fractions, for the data card (client/datacard.py).
    mask_summaries: dict[str, MaskSummary] = field(default_factory=dict)

    def split(self, split: str) -> SplitTensors:
        """The tensors of "train", "val" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def label_counts(self, split: str) -> dict[int, int]:
        """Labelled images per class in that split (unlabelled images are not counted)."""
        labels = self.split(split).labels.tolist()
        return dict(sorted(Counter(label for label in labels if label >= 0).items()))

    def patient_label_counts(self, split: str) -> dict[int, int]:
        """Labelled patients per class in that split.

        This, not the image count, is what a site-by-label test must use: a patient's
        images share the label, so counting images would inflate the chi-square.
        """
        part = self.split(split)
        by_patient = {p: y for p, y in zip(part.patients, part.labels.tolist()) if y >= 0}
        return dict(sorted(Counter(by_patient.values()).items()))


def load_site(
    site_dir: str | Path,
    *,
    image_size: int = 128,
    frame_policy: str = "mip",
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    cache_dir: Path | None = None,
    progress: bool = False,
    num_classes: int = NUM_CLASSES,
) -> SiteData:
    """Read a site folder into tensors by split, decoding each image at most once.

    The cache is one file per (image_size, frame_policy, fractions) in `cache_dir`
    (default `site_dir/.fedir-cache`). It is used only when its key matches: a SHA-256
    over the cache version, these settings, the manifest's bytes, and each listed
    image's size and mtime_ns (or its absence). Any edit to the manifest, or a touched,
    replaced, added or removed image, therefore re-decodes the site. An unwritable cache
    folder (a read-only site) only costs speed: a warning is logged and nothing cached.
    A label outside 0..num_classes-1 makes the manifest invalid (ManifestError).
    """
    root = Path(site_dir).resolve()
    rows = read_manifest(root, num_classes)
    settings = (image_size, frame_policy, val_fraction, test_fraction)
    cache_file = _cache_path(Path(cache_dir) if cache_dir else root / CACHE_DIR_NAME, settings)
    key = cache_key(root, rows, settings)
    payload = read_cache(cache_file, key)
    if payload is None:
        fractions = (val_fraction, test_fraction)
        payload = _decode_site(root, rows, image_size, frame_policy, fractions, progress)
        payload["key"] = key
        write_cache(cache_file, payload)
    return _site_from_payload(root, payload, _clinical_columns(rows))


def _clinical_columns(rows: list[ManifestRow]) -> list[str]:
    """The manifest's clin_* columns (every row carries the same ones)."""
    return list(rows[0].clinical) if rows else []


# ---------------------------------------------------------------------------------------
# Decoding


def _decode_site(
    root: Path,
    rows: list[ManifestRow],
    image_size: int,
    frame_policy: str,
    fractions: tuple[float, float],
    progress: bool,
) -> dict:
    """Decode every listed image into per-split arrays; unreadable files are recorded."""
    parts: dict[str, dict[str, list]] = {
        s: {"images": [], "labels": [], "patients": [], "masks": [], "mask_of": []} for s in SPLITS
    }
    skipped: list[dict[str, str]] = []
    summaries: dict[str, dict] = {}
    for row in tqdm(rows, desc=f"decoding {root.name}", unit="image", disable=not progress):
        relative = _relative(row.path, root)
        masks: list[np.ndarray | None]
        try:
            if row.mask is None:
                images = load_image(row.path, image_size, frame_policy)
                masks = [None] * len(images)
            else:
                labelled = load_labelled_image(row.path, row.mask, row.mask_frames, image_size, frame_policy)
                images, masks = labelled.images, labelled.masks
                if labelled.problem is not None:
                    skipped.append({"path": _relative(row.mask, root), "reason": labelled.problem.reason.value,
                                    "detail": labelled.problem.detail})
                elif labelled.summary is not None:
                    summaries[relative] = asdict(labelled.summary)
        except UnreadableImage as exc:
            skipped.append({"path": relative, "reason": exc.reason.value, "detail": exc.detail})
            continue
        part = parts[row.split or split_of(row.patient_id, *fractions)]
        part["images"].append(images)
        part["labels"].extend([-1 if row.label is None else row.label] * len(images))
        part["patients"].extend([row.patient_id] * len(images))
        for mask in masks:
            part["mask_of"].append(-1 if mask is None else len(part["masks"]))
            if mask is not None:
                part["masks"].append(mask)
    if skipped:
        LOG.warning("%s: skipped %d files (images or masks) of %d rows", root.name, len(skipped), len(rows))
    dims = spatial_dims_of(frame_policy)
    return {"splits": {s: _stack(parts[s], image_size, dims) for s in SPLITS}, "skipped": skipped,
            "mask_summaries": summaries}


def _relative(path: Path, root: Path) -> str:
    """A path as the site's staff wrote it in the manifest: relative, with '/'."""
    return path.relative_to(root).as_posix()


def _stack(part: dict[str, list], image_size: int, dims: int = 2) -> dict:
    """One split's lists -> tensors; an empty split gets shape (0, 1, S, S) (or (0, 1, S, S, S))."""
    images = (
        torch.from_numpy(np.concatenate(part["images"]))
        if part["images"]
        else torch.zeros((0, 1) + (image_size,) * dims, dtype=torch.float32)
    )
    masks = (
        torch.from_numpy(np.stack(part["masks"]))
        if part["masks"]
        else torch.zeros((0, 1) + (image_size,) * dims, dtype=torch.uint8)
    )
    return {
        "images": images,
        "labels": torch.tensor(part["labels"], dtype=torch.int64),
        "patients": list(part["patients"]),
        "masks": masks,
        "mask_of": torch.tensor(part["mask_of"], dtype=torch.int64),
    }


def _site_from_payload(root: Path, payload: dict, clinical: list[str]) -> SiteData:
    """The cached (or just decoded) payload -> SiteData."""
    splits = {
        s: SplitTensors(
            images=part["images"],
            labels=part["labels"],
            patients=list(part["patients"]),
            masks=part["masks"],
            mask_of=part["mask_of"],
        )
        for s, part in payload["splits"].items()
    }
    return SiteData(
        name=root.name,
        root=root,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        skipped=[SkippedFile(**entry) for entry in payload["skipped"]],
        clinical_columns=clinical,
        mask_summaries={path: MaskSummary(**entry) for path, entry in payload["mask_summaries"].items()},
    )


# ---------------------------------------------------------------------------------------
# Cache


def _cache_path(cache_dir: Path, settings: tuple[int, str, float, float]) -> Path:
    """One file per setting, so that changing a setting does not evict the other's cache
    and repeated edits of the site overwrite rather than accumulate files."""
    image_size, frame_policy, val_fraction, test_fraction = settings
    return cache_dir / f"site-s{image_size}-{frame_policy}-v{val_fraction:g}-t{test_fraction:g}.pt"


def cache_key(root: Path, rows: list[ManifestRow], settings: tuple) -> str:
    """SHA-256 of the cache version, settings, manifest bytes and each image's (and mask's) stat.

    Images are identified by size and mtime_ns rather than content: hashing every image
    would cost about as much as decoding it, which is what the cache exists to avoid.
    """
    digest = hashlib.sha256(repr((CACHE_VERSION, settings)).encode())
    digest.update((root / MANIFEST_NAME).read_bytes())
    for row in rows:
        digest.update(f"\x00{_relative(row.path, root)}\x00{_stat_signature(row.path)}".encode())
        if row.mask is not None:
            digest.update(f"\x01{_relative(row.mask, root)}\x00{_stat_signature(row.mask)}".encode())
    return digest.hexdigest()


def _stat_signature(path: Path) -> str:
    """Size and modification time of a file, or 'missing', so a file appearing counts too;
    for a series folder, those of every file in it."""
    try:
        if path.is_dir():
            return "|".join(f"{p.name}:{_stat_signature(p)}" for p in sorted(path.iterdir()))
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def read_cache(cache_file: Path, key: str) -> dict | None:
    """The cached payload when present, loadable and made for this key; else None."""
    if not cache_file.is_file():
        return None
    try:
        payload = torch.load(cache_file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is rebuilt, whatever the error
        LOG.warning("%s: unreadable cache, decoding again (%s)", cache_file, exc)
        return None
    return payload if isinstance(payload, dict) and payload.get("key") == key else None


def write_cache(cache_file: Path, payload: dict) -> None:
    """Write atomically (temporary file + rename), so a concurrent reader never sees half
    a file; on any OS error, warn and carry on uncached."""
    tmp_name = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp", delete=False) as fh:
            tmp_name = fh.name
            torch.save(payload, fh)
        os.replace(tmp_name, cache_file)
    except OSError as exc:
        LOG.warning("%s: cannot write the cache, continuing without it (%s)", cache_file, exc)
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
