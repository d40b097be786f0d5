"""Handcrafted (radiomics) features of a site's images: the table of `data.inputs = "radiomics"`.

A baseline the imaging network must beat, beside the clinical one: IBSI-defined
first-order statistics and grey-level co-occurrence (GLCM) texture features of every image,
one row per image, then the same path as a tabular site (federated standardisation from
every site's n / sum / sum of squares, fedir.server.feature_stats; the federated logistic
regression of fedir.models), and a patient's score is the mean over their images, as for
the imaging model (fedir.metrics.patient_scores).

The image is the one the model sees: the reader's display frames (fedir.client.imaging,
modality and VOI LUT, MONOCHROME1 inverted), the same frame policy and the same resize to
S x S, but before the model input's per-image z-score, which would make the mean, the
standard deviation and the energy the same for every image. There is no region of interest
in a classification manifest (no mask), so the whole image is the region. 2D only: the
"volume" frame policy and the non-classification task kinds are refused (fedir.config).

Features (IBSI reference manual, Zwanenburg et al., Radiology 2020):

- first order, on the intensities X of the N pixels: mean, standard deviation (1/N), skewness
  and excess kurtosis (scipy.stats, biased, as IBSI; 0 for a constant image, as IBSI sets them),
  the 10th, 25th, 50th, 75th and 90th percentiles, the interquartile range, the energy
  sum(X^2), and the intensity-histogram entropy -sum p log2 p of the discretised image;
- GLCM (skimage.feature.graycomatrix / graycoprops): contrast, dissimilarity, homogeneity,
  energy, correlation and ASM of the symmetric, normalised co-occurrence matrix at distance
  1 pixel, each averaged over the four angles 0, 45, 90 and 135 degrees (IBSI's 2D "averaged"
  aggregation). The names are scikit-image's; in IBSI's, homogeneity is the inverse difference
  moment, ASM the joint energy (angular second moment), dissimilarity the difference average,
  and skimage's energy is the square root of ASM.

Discretisation (the entropy and the GLCM): a fixed bin number, GREY_LEVELS = 32 bins over each
image's own minimum to maximum (IBSI's "fixed bin number": a display value has no calibrated
unit across scanners, so a fixed bin width would mean different things at different sites);
a constant image is one grey level.

Extraction costs one decode per image, once: the table is cached in the site's cache folder
(SITE/.fedir-cache/, or node config cache-dir) under the imaging cache's key rule
(fedir.client.site.cache_key), so every later message reads it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from fedir.client.imaging import UnreadableImage, apply_frame_policy, read_display_frames, resize_frames
from fedir.client.manifest import read_manifest
from fedir.client.site import CACHE_DIR_NAME, cache_key, read_cache, write_cache
from fedir.client.split import SPLITS, split_of
from fedir.models import NUM_CLASSES

LOG = logging.getLogger(__name__)

GREY_LEVELS = 32  # fixed bin number of the discretised image (entropy, GLCM)
GLCM_DISTANCES = (1,)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
PERCENTILES = (10, 25, 50, 75, 90)
FIRST_ORDER = ("mean", "sd", "skewness", "kurtosis", *(f"p{q}" for q in PERCENTILES), "iqr", "energy", "entropy")
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
FEATURES = (*(f"fo_{name}" for name in FIRST_ORDER), *(f"glcm_{name}" for name in GLCM_PROPS))
FEATURES_VERSION = 1  # bump when a feature's definition changes, so old caches are not reused


def discretise(image: np.ndarray, levels: int = GREY_LEVELS) -> np.ndarray:
    """(H, W) -> (H, W) uint8 grey levels 0..levels-1: IBSI's fixed bin number over the
    image's own range, floor(levels * (x - min) / (max - min)), the maximum in the top bin;
    a constant image is all 0."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    binned = np.floor(levels * (image.astype(np.float64) - low) / (high - low))
    return np.clip(binned, 0, levels - 1).astype(np.uint8)


def first_order(image: np.ndarray, levels: int = GREY_LEVELS) -> np.ndarray:
    """The FIRST_ORDER features of one (H, W) image, float64 (see the module docstring)."""
    x = image.astype(np.float64).ravel()
    sd = float(x.std())
    constant = sd == 0.0
    quantiles = np.percentile(x, PERCENTILES)
    counts = np.bincount(discretise(image, levels).ravel(), minlength=levels)
    return np.array([
        x.mean(),
        sd,
        0.0 if constant else float(stats.skew(x, bias=True)),
        0.0 if constant else float(stats.kurtosis(x, fisher=True, bias=True)),
        *quantiles,
        quantiles[3] - quantiles[1],  # p75 - p25
        float(np.square(x).sum()),
        float(stats.entropy(counts, base=2)),
    ])


def glcm(image: np.ndarray, levels: int = GREY_LEVELS) -> np.ndarray:
    """The GLCM_PROPS features of one (H, W) image, each the mean over GLCM_ANGLES, float64."""
    from skimage.feature import graycomatrix, graycoprops  # here: only a radiomics site needs it

    matrix = graycomatrix(discretise(image, levels), distances=GLCM_DISTANCES, angles=GLCM_ANGLES,
                          levels=levels, symmetric=True, normed=True)
    return np.array([float(graycoprops(matrix, prop).mean()) for prop in GLCM_PROPS])


def image_features(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (len(FEATURES),) float64: first order, then GLCM."""
    return np.concatenate([first_order(image), glcm(image)])


@dataclass
class RadiomicsSplit:
    """One split: features (n, F) float32, one row per model image; labels (n,) int64
    (-1 unlabelled); each row's patient."""

    x: torch.Tensor
    y: torch.Tensor
    patients: list[str]


@dataclass
class RadiomicsSite:
    """A site's feature table by split and the files it could not read (reason -> count)."""

    name: str
    train: RadiomicsSplit
    val: RadiomicsSplit
    test: RadiomicsSplit
    skipped: Counter

    def patient_label_counts(self) -> dict[int, int]:
        """Labelled training patients per class (a patient's images share the label)."""
        by_patient = {p: y for p, y in zip(self.train.patients, self.train.y.tolist()) if y >= 0}
        return dict(sorted(Counter(by_patient.values()).items()))


def read_radiomics_site(site_dir: str | Path, *, image_size: int, frame_policy: str, val_fraction: float,
                        test_fraction: float, cache_dir: Path | None = None,
                        num_classes: int = NUM_CLASSES) -> RadiomicsSite:
    """Every manifest image's features, by the patient-hash split of its images (so the
    radiomics model is tested on the imaging model's test patients), from the cache when
    its key matches (one file per size, frame policy and split fractions), else extracted
    and cached. ManifestError for a manifest the imaging site would refuse."""
    root = Path(site_dir).resolve()
    rows = read_manifest(root, num_classes)
    settings = ("radiomics", FEATURES_VERSION, GREY_LEVELS, image_size, frame_policy, val_fraction, test_fraction)
    folder = Path(cache_dir) if cache_dir else root / CACHE_DIR_NAME
    cache_file = folder / f"radiomics-s{image_size}-{frame_policy}-v{val_fraction:g}-t{test_fraction:g}.pt"
    key = cache_key(root, rows, settings)
    payload = read_cache(cache_file, key)
    if payload is None:
        parts: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
        skipped: Counter = Counter()
        for row in rows:
            try:
                images = resize_frames(apply_frame_policy(read_display_frames(row.path), frame_policy), image_size)
            except UnreadableImage as exc:
                skipped[exc.reason.value] += 1
                continue
            xs, ys, ps = parts[row.split or split_of(row.patient_id, val_fraction, test_fraction)]
            xs.extend(image_features(image) for image in images)
            ys.extend([-1 if row.label is None else row.label] * len(images))
            ps.extend([row.patient_id] * len(images))
        if skipped:
            LOG.warning("%s: skipped %d unreadable images of %d rows", root.name, sum(skipped.values()), len(rows))
        payload = {"key": key, "skipped": dict(skipped), "splits": {
            s: {"x": torch.from_numpy(np.asarray(xs, dtype=np.float32).reshape(-1, len(FEATURES))),
                "y": torch.tensor(ys, dtype=torch.int64), "patients": ps}
            for s, (xs, ys, ps) in parts.items()}}
        write_cache(cache_file, payload)
    splits = {s: RadiomicsSplit(part["x"], part["y"], list(part["patients"])) for s, part in payload["splits"].items()}
    return RadiomicsSite(root.name, splits["train"], splits["val"], splits["test"], Counter(payload["skipped"]))
