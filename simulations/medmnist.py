"""`fedir data import medmnist`: a MedMNIST `.npz` file as K simulated hospital sites.

MedMNIST (Yang et al. 2023) ships each data set as one `.npz` with `train_images`,
`train_labels`, `val_images`, `val_labels`, `test_images`, `test_labels` (uint8; labels of
shape (N, 1)). This module cuts such a file into K site folders, each a normal fedir site
(`manifest.csv` + images), so every part of fedir (site reader, ClientApp, data card, bias
checks) runs on it unchanged.

Choices, and why:

- **Every official split is partitioned, the test split included.** Site k gets a share of
  the official train, val and test images, drawn with the same partition (IID, or the same
  Dirichlet class proportions), so a site's test images look like its training images, as a
  hospital's own held-out patients do. This is what per-site evaluation and the bias
  checks need (a planted marker or a skewed prevalence must show in the site's test set
  too). The union of the site test sets is exactly the official test split, so a benchmark
  can still score a model on the whole official test split (benchmarks/semi_supervised.py
  does), with no image in two places.
- **The official split is kept**, written into the manifest's `split` column, which
  overrides fedir's patient-hash split. MedMNIST publishes no patient IDs, so each image is
  its own patient (`patient_id` = `<file stem>-<split>-<official index>`): the split is by
  image, as MedMNIST's own is.
- **Files**: 2D images as 8-bit PNG (read in about 80 us each here against 120 us for
  `.npy`, the same size on disk); 3D volumes (VesselMNIST3D) as `.npy`, which keeps the
  volume (read it with `data.frame-policy = "volume"` and a 3D network).
- **Partitions**: `iid` shuffles each split and cuts it into K near-equal parts.
  `dirichlet:ALPHA` (Hsu et al. 2019) draws, for each class, the sites' shares from a
  Dirichlet(ALPHA, ..., ALPHA) and cuts that class's images of every split by them: small
  ALPHA = strong label skew between sites. A draw that leaves a site with fewer than
  `MIN_TRAIN_PER_SITE` training images is redrawn (from the same seeded generator).
- **Labelled fraction**: in each site's training share, `round(F x n_c)` images of each
  class c (at least one where the class is present) keep their label, the rest get an
  empty label (unlabelled, for the semi-supervised objectives). Val and test images are
  always labelled: a study annotates its reference standard.
- **Hooks for bias-detector calibration** (both off by default):
  `marker_site = N` burns a bright square (value 255, side `max(2, round(0.1 x side))`
  pixels; a cube for volumes) into the top-left corner of every image of site N, every
  split: a scanner overlay a network can learn to recognise the site by.
  `prevalence_skew = S` (0 <= S < 1) drops a random share S of site `skew_site`'s negative
  (label 0) images in every split before anything else is chosen, so that site's positive
  fraction rises from p to p / (p + (1 - p)(1 - S)); the dropped images are not written.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedir.client.manifest import MANIFEST_NAME, SPLIT_COLUMN
from fedir.client.split import SPLITS
from fedir.errors import UserError

REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
MIN_TRAIN_PER_SITE = 2
MAX_DRAWS = 1000
MARKER_VALUE = 255
FEDERATION_FILE = "federation.json"


class MedMNISTError(UserError, ValueError):
    """The file or the options cannot make a federation; the message says which and why."""


@dataclass(frozen=True)
class Partition:
    """`iid`, or `dirichlet` with its concentration `alpha`."""

    kind: str
    alpha: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Partition:
        """`iid` or `dirichlet:ALPHA` (ALPHA > 0); anything else is a MedMNISTError."""
        text = text.strip().lower()
        if text == "iid":
            return cls("iid")
        kind, _, raw = text.partition(":")
        if kind == "dirichlet":
            try:
                alpha = float(raw)
            except ValueError:
                alpha = float("nan")
            if np.isfinite(alpha) and alpha > 0:
                return cls("dirichlet", alpha)
        raise MedMNISTError(f"partition {text!r}: use iid or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5)")

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


def load_npz(npz: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, labels)} from a MedMNIST file, checked: keys present, counts equal,
    labels binary (fedir's task has two classes)."""
    path = Path(npz)
    if not path.is_file():
        raise MedMNISTError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise MedMNISTError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in data.files]
    if missing:
        raise MedMNISTError(f"{path}: missing key(s) {', '.join(missing)} "
                            f"(found: {', '.join(data.files) or 'none'}); is it a MedMNIST file?")
    out = {}
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        if len(images) != len(labels):
            raise MedMNISTError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
        if images.ndim not in (3, 4):
            raise MedMNISTError(f"{path}: {split}_images has shape {images.shape}; "
                                "expected (N, H, W), (N, H, W, 3) or (N, D, H, W)")
        if labels.size and not set(np.unique(labels).tolist()) <= {0, 1}:
            raise MedMNISTError(f"{path}: {split} labels {sorted(np.unique(labels).tolist())} are not binary; "
                                "fedir's task has two classes (0, 1)")
        out[split] = (images, labels.astype(np.int64))
    return out


def is_volume(images: np.ndarray) -> bool:
    """(N, D, H, W) volumes, as opposed to (N, H, W) grey or (N, H, W, 3) colour images."""
    return images.ndim == 4 and images.shape[-1] not in (3, 4)


def site_shares(labels: dict[str, np.ndarray], sites: int, partition: Partition,
                rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """{split: [official indices of site 0, ..., site K-1]}: each index in exactly one site."""
    if partition.kind == "iid":
        return {s: [np.sort(p) for p in np.array_split(rng.permutation(len(y)), sites)]
                for s, y in labels.items()}
    classes = sorted(set(np.concatenate(list(labels.values())).tolist()))
    for _ in range(MAX_DRAWS):
        props = {c: rng.dirichlet(np.full(sites, partition.alpha)) for c in classes}
        shares = {s: _dirichlet_cut(y, props, sites, rng) for s, y in labels.items()}
        if min(len(p) for p in shares["train"]) >= MIN_TRAIN_PER_SITE:
            return shares
    raise MedMNISTError(f"{partition}: no draw in {MAX_DRAWS} gave every one of {sites} sites "
                        f"{MIN_TRAIN_PER_SITE} training images; use fewer sites or a larger ALPHA")


def _dirichlet_cut(y: np.ndarray, props: dict[int, np.ndarray], sites: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Cut each class's (shuffled) indices by that class's site proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
    for c, p in props.items():
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def skew_prevalence(indices: np.ndarray, y: np.ndarray, skew: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Drop a random share `skew` of the negatives among `indices` (sorted result)."""
    negatives = indices[y[indices] == 0]
    drop = rng.choice(negatives, size=int(round(skew * len(negatives))), replace=False)
    return np.setdiff1d(indices, drop)


def choose_labelled(indices: np.ndarray, y: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> set[int]:
    """Per class, round(fraction x n_c) of the site's training images keep their label
    (at least one per present class when fraction > 0)."""
    keep: set[int] = set()
    if fraction <= 0:
        return keep
    for c in np.unique(y[indices]):
        idx = indices[y[indices] == c]
        n = min(len(idx), max(1, int(round(fraction * len(idx)))))
        keep.update(rng.choice(idx, size=n, replace=False).tolist())
    return keep


def burn_marker(image: np.ndarray, volume: bool) -> np.ndarray:
    """A copy of the image with a bright square (cube for a volume) in the top-left corner."""
    out = image.copy()
    spatial = out.shape[:3] if volume else out.shape[:2]
    side = max(2, int(round(0.1 * min(spatial))))
    if volume:
        out[:side, :side, :side] = MARKER_VALUE
    else:
        out[:side, :side, ...] = MARKER_VALUE
    return out


def _write_image(path: Path, image: np.ndarray, volume: bool) -> None:
    if volume:
        np.save(path, np.ascontiguousarray(image))
    else:
        Image.fromarray(np.ascontiguousarray(image)).save(path)


def import_medmnist(
    npz: str | Path,
    out: str | Path,
    *,
    sites: int,
    partition: str = "iid",
    labelled_fraction: float = 1.0,
    seed: int = 0,
    marker_site: int | None = None,
    prevalence_skew: float = 0.0,
    skew_site: int = 0,
) -> dict:
    """Write OUT/site-0 ... OUT/site-{K-1} and OUT/federation.json; return that record
    (parameters and, per site, images, labelled images and positives per split)."""
    if sites < 1:
        raise MedMNISTError(f"--sites {sites}: need at least one site")
    part = Partition.parse(partition)
    if not 0.0 <= labelled_fraction <= 1.0:
        raise MedMNISTError(f"--labelled-fraction {labelled_fraction}: must be within [0, 1]")
    for name, value in (("--marker-site", marker_site), ("--skew-site", skew_site)):
        if value is not None and not 0 <= value < sites:
            raise MedMNISTError(f"{name} {value}: must be a site index 0..{sites - 1}")
    if not 0.0 <= prevalence_skew < 1.0:
        raise MedMNISTError(f"--prevalence-skew {prevalence_skew}: must be within [0, 1)")
    data = load_npz(npz)
    stem = Path(npz).stem
    volume = is_volume(data["train"][0])
    suffix = ".npy" if volume else ".png"
    rng = np.random.default_rng(seed)
    shares = site_shares({s: y for s, (_, y) in data.items()}, sites, part, rng)
    record: dict = {"source": Path(npz).name, "sites": sites, "partition": str(part),
                    "labelled_fraction": labelled_fraction, "seed": seed, "marker_site": marker_site,
                    "prevalence_skew": prevalence_skew, "skew_site": skew_site,
                    "volume": volume, "per_site": {}}
    root = Path(out)
    for k in range(sites):
        name = f"site-{k}"
        folder = root / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows, counts = [], {}
        for split in SPLITS:
            images, y = data[split]
            idx = shares[split][k]
            if prevalence_skew > 0 and k == skew_site:
                idx = skew_prevalence(idx, y, prevalence_skew, rng)
            labelled = (choose_labelled(idx, y, labelled_fraction, rng) if split == "train"
                        else set(idx.tolist()))
            for i in idx.tolist():
                image = burn_marker(images[i], volume) if k == marker_site else images[i]
                rel = f"images/{split}-{i:06d}{suffix}"
                _write_image(folder / rel, image, volume)
                rows.append({"patient_id": f"{stem}-{split}-{i:06d}", "path": rel,
                             "label": int(y[i]) if i in labelled else "", SPLIT_COLUMN: split})
            counts[split] = {"images": int(len(idx)), "labelled": len(labelled),
                             "positives": int(y[idx].sum())}
        with (folder / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["patient_id", "path", "label", SPLIT_COLUMN])
            writer.writeheader()
            writer.writerows(rows)
        record["per_site"][name] = counts
    (root / FEDERATION_FILE).write_text(json.dumps(record, indent=2))
    return record
