"""A synthetic X-ray angiography (XA) federation, written as real DICOM files.

Why: the demo, the tests and a researcher's first simulation need a multi-site imaging
federation on a machine with no patient data. This module writes one: every site is a
folder with `manifest.csv` (docs/site-guide.md) and uncompressed XA DICOM files that go through
the same reader as a hospital's export, including the awkward parts a real reader must
handle (modality LUT, VOI window, MONOCHROME1, 10- and 12-bit data, cine runs).

The task. Each image shows a contrast-filled, coronary-like vessel tree (branching,
curved, tapering vessels) over a smooth noisy anatomical background. Label 1 means a
significant stenosis in every image of the patient: one or two trunks carry a focal
narrowing of 60-95% of the diameter (uniform, so some positives are subtle) in their
proximal half, and the trunk and every branch leaving it downstream fill more faintly,
the more so the tighter the stenosis (a 60% lesion barely, a 95% one by up to 70%).
Label 0 means none: mild irregularities of at most 30% are present in both classes, so
"any narrowing" is not the answer. A patient has 2-4 images (at least one cine run and
one single frame) that share the label; each image is a different projection (its own
tree). The vessels are 1.8x version 3's calibre (TRUNK_WIDTH) so that the lesion survives
the reader's resize: at 64 px a proximal trunk is 3-4 px wide (at half maximum) and a
lesion 6-19 px long. Whether a small CNN learns this from a few hundred patients, and not
from a few dozen, is what benchmarks/synthetic_learnability.py measures; at the time of
writing that curve is not yet established for this version.

Pixel convention. After the modality LUT and MONOCHROME1 inversion, pixel values increase
with iodine: vessels are BRIGHTER than the background at every site. This is chosen so
that a maximum-intensity projection over a cine run (fedir's default frame policy) keeps
the peak-contrast frames; the MONOCHROME1 site stores the inverted values, so it only
looks like the others once the reader inverts it.

Sites differ the way scanners do: vendor and model names, bit depth (10 or 12 bits),
rescale slope/intercept (some sites), a VOI window (some sites), MONOCHROME1 (site-1
only), noise, vessel contrast, blur, an intensity curve (gamma), collimator shutters
(dark or bright edges) and a burned-in corner marker. The marker and shutters are site
artefacts a model can learn to recognise, which is what a Frankenstein federation exploits.

Labels and splits. The split of a patient is `fedir.client.split.split_of(patient_id)` with its
defaults. Validation and test patients are ALWAYS labelled (a study annotates its
reference standard); a fraction `unlabelled_fraction` of the TRAIN patients (drawn per
patient) have their label removed, for the semi-supervised objective.

Confounding. `confound` in [0, 1] makes label prevalence depend on the site: 0 gives the
same prevalence (0.4) everywhere, 1 gives site-0 a prevalence of 0.95 and every other
site 0.05; values in between interpolate linearly.

Masks (`mask_fraction`, `fedir data synth --masks`). The generator knows the geometry it
drew, so it writes the exact label map of an image (`vessel_labels`: 1 = contrast-filled
vessel lumen, 2 = the segment of a trunk that a significant stenosis occupies, 0 =
background) for the frames it outlines: the cine's tree does not move, so every frame has
the same map, and which frames carry it is what makes a run partly labelled. Without
`mask_fraction` nothing changes: the same files and manifest, byte for byte, as before.

Time (`fedir data synth --scanner-change SITE:YYYY-MM-DD`). Every patient has a study date
in 2020-2024 (uniform; the DICOM StudyDate), written to the manifest's `acquired` column,
so a site's test metrics can be reported per period (fedir.client.drift). A scanner
change at one site from a date on gives that site's images acquired on or after it a
different detector (`replaced_scanner`: SCANNER_CHANGE times the noise and blur, a lower
vessel contrast, the model name marked), drawn from the same random numbers, so the
pixels of the images before the date, of every other site's, and of every image without the
option are those of version 4 (version 5 adds the `acquired` column; the UIDs, derived from
the parameters, change with the version).

Outcome (`outcome`, `fedir data synth --outcome`). Each patient gets a time to a major
adverse event after the procedure (restenosis, revascularisation or death), written to the
manifest's `time` (days) and `event` (1 = observed, 0 = censored) columns for a
`task.kind = "survival"` study: a Weibull proportional-hazards draw (`draw_outcome`) whose
log hazard ratio grows with the patient's stenosis burden (`lesion_narrowing`: the mean over
the patient's images of the tightest significant lesion's diameter reduction, 0 without one,
so the images carry the signal), with age and sex (OUTCOME_EFFECTS). Follow-up starts at the
study date and ends at the site's data cut-off (`follow_up_end`: sites stop following
patients at different dates), where every patient still event-free is censored
(administrative censoring), so follow-up length depends on the site. The draw uses its own
random stream (seeded by the seed, site, patient and OUTCOME_STREAM): without `outcome` the
files and manifest are those of version 5 byte for byte, and with it the pixels are too (the
UIDs, derived from the parameters, differ).

Everything is deterministic given the seed, and the result is cached: `federation.json`
records the parameters, and a second call with the same parameters returns it without
rewriting anything. All identifiers are made up (PatientName "SYNTH^...").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from tqdm import tqdm

from fedir.client.manifest import MANIFEST_NAME, write_manifest
from fedir.client.split import split_of
from fedir.errors import BadParameter, OutputExists
from fedir.simulations.mask_files import write_png, write_seg

GENERATOR_VERSION = 5  # 5: the manifest's acquired column and the scanner change (images as version 4's)
FEDERATION_FILE = "federation.json"
XA_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.12.1"
BASE_PREVALENCE = 0.4
CONFOUNDED_PREVALENCE = (0.95, 0.05)  # (site-0, every other site) at confound=1
MONOCHROME1_SITE = 1
SEGMENTS_PER_CHUNK = 8
MAX_WORKERS = 8
# Vessel calibre relative to version 3's trees (trunk radius 5-6.5 px at 256 px): a
# magnified view, so that at the reader's 64 px a trunk is 3-4 px wide and a lesion
# spans several pixels instead of vanishing in the resize.
TRUNK_WIDTH = 1.8
# Mask labels (client/masks.py reads the same values): the contrast-filled lumen, and the
# segment of a trunk that a significant stenosis occupies, at its calibre before the lesion,
# within LESION_EXTENT sigmas of the lesion's centre along the vessel.
VESSEL_LABEL, STENOSIS_LABEL = 1, 2
LESION_EXTENT = 2.0
# A scanner change (replaced_scanner): factors on the site's noise, blur and vessel contrast,
# a noisier, softer, lower-contrast detector on which a subtle stenosis is harder to see.
SCANNER_CHANGE = {"noise": 3.0, "blur": 1.6, "contrast": 0.5}
STUDY_START, STUDY_DAYS = dt.date(2020, 1, 1), 5 * 365  # the study dates: 2020-2024
# The outcome (generate_federation's `outcome`): Weibull proportional hazards,
# S(t | x) = exp(-(t / OUTCOME_SCALE_DAYS)^OUTCOME_SHAPE * exp(lp)), lp = the log hazard ratios below
# times the stenosis burden (0..0.95), (age - 60) / 10 and sex. A patient without a significant
# lesion (lp about 0) has a median event-free time of about 8 years, one with an 80% stenosis about 1.5.
OUTCOME_SHAPE, OUTCOME_SCALE_DAYS = 1.2, 3960.0
OUTCOME_EFFECTS = {"stenosis": 2.5, "age_decade": 0.3, "sex": 0.2}
OUTCOME_STREAM = 17  # the outcome's own random stream: drawing it leaves the images' stream as it was
# Each site's data cut-off (cycled beyond four sites): patients enrolled 2020-2024 are followed
# until it, so site-0's follow-up is 0.5-5.5 years and site-3's 3.5-8.5.
FOLLOW_UP_ENDS = (dt.date(2025, 6, 30), dt.date(2026, 6, 30), dt.date(2027, 6, 30), dt.date(2028, 6, 30))
PARALLEL_MIN_PATIENTS = 24  # below this, starting workers costs more than it saves
_FORK = "fork"  # workers inherit the imported modules; spawn would re-import the caller


@dataclass(frozen=True)
class SiteProfile:
    """One scanner's character: DICOM encoding and image appearance."""

    manufacturer: str
    model: str
    bits_stored: int
    rescale: tuple[float, float] | None  # (slope, intercept) or no modality LUT
    window: bool  # write a VOI window covering the data
    monochrome1: bool
    noise: float  # std of additive noise, in display units [0, 1]
    contrast: float  # peak iodine signal of a trunk
    blur: float  # Gaussian blur in pixels at 256x256 (focal spot, detector)
    gamma: float  # intensity curve of the processing chain
    shutter: tuple[float, float]  # (border fraction, shutter grey level)
    round_shutter: bool  # circular (image intensifier) or rectangular collimation
    marker_corner: int  # 0..3: top-left, top-right, bottom-left, bottom-right


_VENDORS = (
    ("Helion Medical", "AngioStar 9", 12, None, False, 0.030, 0.30, 0.8, 1.00, (0.06, 0.02), False),
    ("Corvex Imaging", "CV-Cath 300", 10, None, True, 0.040, 0.26, 1.1, 0.85, (0.08, 0.95), False),
    ("Nordlys Systems", "VascuView X", 12, (2.0, -1024.0), True, 0.025, 0.32, 0.6, 1.15, (0.10, 0.05), True),
    ("Tessaray", "TR-Flux 12", 10, (1.0, -512.0), False, 0.045, 0.28, 1.3, 0.95, (0.05, 0.90), False),
    ("Quillon Health", "QH Arc 5", 12, None, True, 0.035, 0.27, 0.9, 1.05, (0.07, 0.03), True),
    ("Aurel Devices", "Lumen LX", 10, (0.5, 0.0), True, 0.030, 0.29, 1.0, 0.90, (0.09, 0.85), False),
)


def site_profile(site: int) -> SiteProfile:
    """The scanner of site `site`; beyond the six vendors, models repeat with a unit number."""
    name, model, bits, rescale, window, noise, contrast, blur, gamma, shutter, round_ = _VENDORS[
        site % len(_VENDORS)
    ]
    if site >= len(_VENDORS):
        name = f"{name} Unit {site}"
    return SiteProfile(
        manufacturer=name,
        model=model,
        bits_stored=bits,
        rescale=rescale,
        window=window,
        monochrome1=site == MONOCHROME1_SITE,
        noise=noise,
        contrast=contrast,
        blur=blur,
        gamma=gamma,
        shutter=shutter,
        round_shutter=round_,
        marker_corner=site % 4,
    )


def replaced_scanner(profile: SiteProfile) -> SiteProfile:
    """The site's detector after a scanner change: SCANNER_CHANGE applied, the model renamed;
    the DICOM encoding, shutters and burned-in marker stay the site's."""
    return replace(profile, model=f"{profile.model} (replaced)", noise=profile.noise * SCANNER_CHANGE["noise"],
                   blur=profile.blur * SCANNER_CHANGE["blur"], contrast=profile.contrast * SCANNER_CHANGE["contrast"])


def site_prevalence(site: int, confound: float) -> float:
    """Label prevalence of a site, interpolated between unconfounded and fully confounded."""
    target = CONFOUNDED_PREVALENCE[0] if site == 0 else CONFOUNDED_PREVALENCE[1]
    return (1.0 - confound) * BASE_PREVALENCE + confound * target


# ---------------------------------------------------------------------------- geometry


@dataclass
class Vessel:
    """A centreline (N x 2 points, row/col pixels) with a radius per point."""

    points: np.ndarray
    radius: np.ndarray
    level: int  # 0 trunk, 1 main branch, 2 side branch
    opacity: np.ndarray | None = None  # iodine filling per point (1 = full)
    parent: Vessel | None = None  # the vessel this one branches from (None for a trunk)
    origin: int = 0  # index of the parent's point where this one leaves it
    # Significant stenoses: (first point, last point, radius before the lesion) per lesion,
    # the vessel segment that the mask labels STENOSIS_LABEL (vessel_labels).
    lesions: list[tuple[int, int, np.ndarray]] = field(default_factory=list)


def _centreline(rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
                step: float) -> np.ndarray:
    """A smoothly curving path: the heading follows a few random low-frequency sines."""
    n = max(int(length / step), 4)
    t = np.linspace(0.0, 1.0, n)
    wiggle = sum(
        rng.normal(0, 0.35) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        for f in (0.5, 1.0, 1.7)
    )
    heading = angle + wiggle
    steps = step * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    return start + np.vstack([np.zeros(2), np.cumsum(steps[:-1], axis=0)])


def _vessel_tree(rng: np.random.Generator, size: int) -> list[Vessel]:
    """Two or three tapering trunks from a common ostium, each with branches and twigs."""
    scale = size / 256.0
    step = 1.5 * scale
    ostium = np.array([rng.uniform(0.15, 0.35), rng.uniform(0.3, 0.7)]) * size
    vessels: list[Vessel] = []
    base_angle = rng.uniform(0.3, 1.3)  # downwards, towards the image centre
    for trunk in range(int(rng.integers(2, 4))):
        angle = base_angle + (trunk - 1) * rng.uniform(0.6, 0.9) + rng.normal(0, 0.15)
        length = rng.uniform(0.55, 0.8) * size
        r0 = rng.uniform(5.0, 6.5) * TRUNK_WIDTH * scale
        pts = _centreline(rng, ostium, angle, length, step)
        vessels.append(Vessel(pts, np.linspace(r0, 0.45 * r0, len(pts)), 0))
    for parent in [v for v in vessels if v.level == 0]:
        vessels.extend(_branches(rng, parent, size, step, count=int(rng.integers(2, 4)), level=1))
    for parent in [v for v in vessels if v.level == 1]:
        vessels.extend(_branches(rng, parent, size, step, count=int(rng.integers(0, 3)), level=2))
    return vessels


def _branches(rng: np.random.Generator, parent: Vessel, size: int, step: float, count: int,
              level: int) -> list[Vessel]:
    """Daughter vessels leaving `parent` at 25-60 degrees, thinner and shorter."""
    out = []
    n = len(parent.points)
    for _ in range(count):
        i = int(rng.uniform(0.15, 0.8) * (n - 1))
        d = parent.points[min(i + 1, n - 1)] - parent.points[max(i - 1, 0)]
        heading = np.arctan2(d[0], d[1]) + rng.choice([-1, 1]) * rng.uniform(0.45, 1.05)
        length = rng.uniform(0.25, 0.45) * size * (0.7 if level == 2 else 1.0)
        r0 = parent.radius[i] * rng.uniform(0.55, 0.75)
        pts = _centreline(rng, parent.points[i], heading, length, step)
        out.append(Vessel(pts, np.linspace(r0, 0.4 * r0, len(pts)), level, parent=parent, origin=i))
    return out


def _narrow(vessel: Vessel, severity: float, where: float, length: float) -> tuple[float, float]:
    """Apply a focal narrowing (fraction `severity` of the diameter) at fraction `where`.

    `length` is the Gaussian sigma of the narrowing along the vessel, in multiples of the
    vessel's local radius, so a lesion has the same shape on a thick or a thin vessel.
    Returns the lesion's centre and sigma along the vessel, in points.
    """
    arc = np.arange(len(vessel.points), dtype=float)
    centre = where * (len(arc) - 1)
    width = length * vessel.radius[int(centre)] / max(
        np.linalg.norm(vessel.points[1] - vessel.points[0]), 1e-6
    )
    vessel.radius = vessel.radius * (1.0 - severity * np.exp(-0.5 * ((arc - centre) / width) ** 2))
    return centre, width


def _slow_distal_flow(vessel: Vessel, where: float, drop: float) -> None:
    """Fainter opacification beyond a stenosis (reduced flow downstream), by `drop`."""
    arc = np.linspace(0.0, 1.0, len(vessel.points))
    vessel.opacity = 1.0 - drop / (1.0 + np.exp(-(arc - where - 0.05) / 0.03))


def _inherit_filling(vessels: list[Vessel]) -> None:
    """A branch fills only as well as its parent at the branch point: contrast that a
    stenosis holds back is missing from every vessel downstream of it, not only the trunk.
    Parents come before their branches in `vessels`, so one pass carries it down the tree."""
    for v in vessels:
        if v.parent is None or v.parent.opacity is None:
            continue
        inflow = float(v.parent.opacity[v.origin])
        v.opacity = inflow * (np.ones(len(v.points)) if v.opacity is None else v.opacity)


# Stenosis grade labels (generate_federation's `grades`): 0 none, 1 moderate, 2 severe, with
# the lesion's diameter reduction drawn in the grade's range; the binary label's range is
# that of _add_lesions' positives.
GRADES = ("none", "moderate", "severe")
GRADE_SEVERITY = {1: (0.5, 0.7), 2: (0.7, 0.95)}
BINARY_SEVERITY = (0.6, 0.95)


def _add_lesions(rng: np.random.Generator, vessels: list[Vessel], label: int, graded: bool = False) -> None:
    """Mild irregularities in every image; a graded significant stenosis on a trunk if label 1.

    The stenosis is a local "waist": the trunk is bright on both sides of it and keeps
    most of its filling downstream, so what separates the classes is a focal feature a
    convolutional network can learn, not the absence of a vessel (version 3's 85-97%
    near-occlusion with 70-90% distal fading made a positive look like a tree with one
    trunk fewer). Severity is graded (50-90% of the diameter, uniform): the mildest
    positives are 50-60% against the negatives' at most 30%, so some are subtle.
    `graded`: `label` is a stenosis grade (GRADES), its narrowing in GRADE_SEVERITY's range.
    """
    for _ in range(int(rng.integers(1, 4))):
        v = vessels[int(rng.integers(len(vessels)))]
        _narrow(v, rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.8), rng.uniform(1.2, 2.5))
    if label >= 1:
        low, high = GRADE_SEVERITY[label] if graded else BINARY_SEVERITY
        trunks = [v for v in vessels if v.level == 0]
        count = 1 + int(len(trunks) > 1 and rng.random() < 0.5)
        for i in rng.permutation(len(trunks))[:count]:
            where = rng.uniform(0.15, 0.45)
            severity = rng.uniform(low, high)
            healthy = trunks[i].radius.copy()
            centre, width = _narrow(trunks[i], severity, where, rng.uniform(1.5, 3.0))
            first = max(int(np.floor(centre - LESION_EXTENT * width)), 0)
            last = min(int(np.ceil(centre + LESION_EXTENT * width)), len(healthy) - 1)
            trunks[i].lesions.append((first, last, healthy))
            _slow_distal_flow(trunks[i], where, drop=rng.uniform(0.3, 0.7) * (severity - 0.5) / 0.45)
        _inherit_filling(vessels)


def _render_vessels(vessels: list[Vessel], size: int) -> np.ndarray:
    """Projected iodine thickness: a Gaussian cross-section around every centreline segment.

    Segments are drawn in runs of SEGMENTS_PER_CHUNK, vectorised over the run's bounding
    box, so the cost scales with vessel length rather than image area; overlapping vessels
    combine by maximum so junctions do not double in density.
    """
    out = np.zeros((size, size), dtype=np.float32)
    r_ref = 4.5 * TRUNK_WIDTH * size / 256.0  # iodine signal follows the width relative to a trunk's
    for v in vessels:
        amplitude = v.radius / r_ref * (1.0 if v.opacity is None else v.opacity)
        for start in range(0, len(v.points) - 1, SEGMENTS_PER_CHUNK):
            stop = min(start + SEGMENTS_PER_CHUNK, len(v.points) - 1)
            run = slice(start, stop + 1)
            _draw_segments(out, v.points[run], amplitude[run], v.radius[run])
    return out


def _draw_segments(out: np.ndarray, points: np.ndarray, amplitude: np.ndarray,
                   radius: np.ndarray) -> None:
    """Max-composite the segments of one polyline run (points[i] to points[i+1]) into `out`."""
    size = out.shape[0]
    reach = 2.5 * float(radius.max()) + 1.5
    lo = np.clip(np.floor(points.min(axis=0) - reach), 0, size).astype(int)
    hi = np.clip(np.ceil(points.max(axis=0) + reach), 0, size).astype(int)
    if (hi <= lo).any():
        return
    p0 = points[:-1, :, None, None].astype(np.float32)
    d = (points[1:] - points[:-1])[:, :, None, None].astype(np.float32)
    rows = np.arange(lo[0], hi[0], dtype=np.float32)[None, :, None] - p0[:, 0]
    cols = np.arange(lo[1], hi[1], dtype=np.float32)[None, None, :] - p0[:, 1]
    denom = np.maximum((d**2).sum(axis=1), 1e-6)
    t = np.clip((rows * d[:, 0] + cols * d[:, 1]) / denom, 0.0, 1.0)
    dist2 = (rows - t * d[:, 0]) ** 2 + (cols - t * d[:, 1]) ** 2
    r0, r1 = radius[:-1, None, None], radius[1:, None, None]
    a0, a1 = amplitude[:-1, None, None], amplitude[1:, None, None]
    sigma = np.maximum(0.6 * (r0 + t * (r1 - r0)), 0.5)
    value = (a0 + t * (a1 - a0)) * np.exp(-0.5 * dist2 / sigma**2)
    window = out[lo[0]:hi[0], lo[1]:hi[1]]
    np.maximum(window, value.max(axis=0), out=window)


def vessel_labels(vessels: list[Vessel], size: int) -> np.ndarray:
    """The exact label map of a tree, (size, size) uint8: VESSEL_LABEL where a pixel centre
    lies within the local radius of a centreline segment (the radius interpolated along the
    segment, as the renderer does), STENOSIS_LABEL over each significant lesion's segment at
    its calibre before the lesion (overriding the vessel label), 0 elsewhere. A cine's frames
    share the tree, so every frame of an image has this map."""
    out = np.zeros((size, size), dtype=np.uint8)
    for v in vessels:
        for start in range(0, len(v.points) - 1, SEGMENTS_PER_CHUNK):
            run = slice(start, min(start + SEGMENTS_PER_CHUNK, len(v.points) - 1) + 1)
            _fill_segments(out, v.points[run], v.radius[run], VESSEL_LABEL)
    for v in vessels:
        for first, last, healthy in v.lesions:
            run = slice(first, max(last, first + 1) + 1)
            _fill_segments(out, v.points[run], healthy[run], STENOSIS_LABEL)
    return out


def _fill_segments(out: np.ndarray, points: np.ndarray, radius: np.ndarray, label: int) -> None:
    """Set `label` on every pixel within the interpolated radius of a polyline run."""
    size = out.shape[0]
    reach = float(radius.max()) + 1.0
    lo = np.clip(np.floor(points.min(axis=0) - reach), 0, size).astype(int)
    hi = np.clip(np.ceil(points.max(axis=0) + reach), 0, size).astype(int)
    if (hi <= lo).any():
        return
    p0 = points[:-1, :, None, None]
    d = (points[1:] - points[:-1])[:, :, None, None]
    rows = np.arange(lo[0], hi[0], dtype=float)[None, :, None] - p0[:, 0]
    cols = np.arange(lo[1], hi[1], dtype=float)[None, None, :] - p0[:, 1]
    t = np.clip((rows * d[:, 0] + cols * d[:, 1]) / np.maximum((d**2).sum(axis=1), 1e-12), 0.0, 1.0)
    dist2 = (rows - t * d[:, 0]) ** 2 + (cols - t * d[:, 1]) ** 2
    r = radius[:-1, None, None] + t * (radius[1:, None, None] - radius[:-1, None, None])
    inside = (dist2 <= r**2).any(axis=0)
    out[lo[0]:hi[0], lo[1]:hi[1]][inside] = label


# ----------------------------------------------------------------------------- images


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled with cubic splines."""
    coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    return ndimage.zoom(coarse, size / cells, order=1, mode="nearest", grid_mode=True)[:size, :size]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft-tissue/lung-like background: a broad gradient plus low-frequency structure."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 0.08 * (np.cos(angle) * yy + np.sin(angle) * xx)
    return 0.35 + gradient + 0.05 * _smooth_field(rng, size, 6) + 0.02 * _smooth_field(rng, size, 16)


def contrast_curve(frames: int) -> np.ndarray:
    """Fraction of peak iodine per frame: washing in and out, peaking in the middle frames."""
    k = np.arange(frames, dtype=float)
    return np.exp(-0.5 * ((k - (frames - 1) / 2) / (frames / 4.0)) ** 2)


def _marker(site: int, size: int) -> tuple[np.ndarray, slice, slice]:
    """A burned-in 3x3 block pattern encoding the site, in the site's corner."""
    bits = np.array([(site * 37 + 11) >> i & 1 for i in range(9)], dtype=np.float32).reshape(3, 3)
    bits[1, 1] = 1.0  # never blank
    block = max(size // 48, 1)
    pattern = np.kron(bits, np.ones((block, block), dtype=np.float32))
    margin = max(size // 32, 1)
    n = pattern.shape[0]
    corner = site % 4
    r0 = margin if corner < 2 else size - margin - n
    c0 = margin if corner % 2 == 0 else size - margin - n
    return pattern, slice(r0, r0 + n), slice(c0, c0 + n)


def _shutter_mask(profile: SiteProfile, size: int) -> np.ndarray:
    """True outside the collimated field."""
    border, _ = profile.shutter
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if profile.round_shutter:
        return (yy - 0.5) ** 2 + (xx - 0.5) ** 2 > (0.5 - border * 0.3) ** 2 + 0.03
    return (yy < border) | (yy > 1 - border) | (xx < border) | (xx > 1 - border)


def render_image(rng: np.random.Generator, site: int, label: int, frames: int,
                 size: int) -> np.ndarray:
    """Display values in [0, 1] (vessels bright), shape (frames, size, size)."""
    return render_image_and_tree(rng, site, label, frames, size)[0]


def render_image_and_tree(rng: np.random.Generator, site: int, label: int, frames: int,
                          size: int, profile: SiteProfile | None = None,
                          graded: bool = False) -> tuple[np.ndarray, list[Vessel]]:
    """`render_image` and the vessel tree it drew (for `vessel_labels`); `profile` is the
    scanner (default: the site's own, `site_profile`; a scanner change passes another);
    `graded`: `label` is a stenosis grade (GRADES)."""
    profile = profile or site_profile(site)
    vessels = _vessel_tree(rng, size)
    _add_lesions(rng, vessels, label, graded)
    iodine = _render_vessels(vessels, size)
    iodine = ndimage.gaussian_filter(iodine, profile.blur * size / 256.0)
    background = _background(rng, size)
    curve = contrast_curve(frames) if frames > 1 else np.ones(1)
    contrast = profile.contrast * rng.uniform(0.85, 1.15)
    stack = background[None] + contrast * curve[:, None, None].astype(np.float32) * iodine[None]
    stack += profile.noise * rng.standard_normal(stack.shape, dtype=np.float32)
    stack = np.clip(stack, 0.0, 1.0) ** profile.gamma
    stack[:, _shutter_mask(profile, size)] = profile.shutter[1]
    pattern, rows, cols = _marker(site, size)
    stack[:, rows, cols] = np.maximum(stack[:, rows, cols], pattern)
    return stack, vessels


# ------------------------------------------------------------------------------ DICOM


def encode_pixels(display: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """Display values in [0, 1] to stored values, so that the reader's chain undoes it.

    Stored = display scaled to the full BitsStored range; a MONOCHROME1 site stores the
    inverse (max - value). The modality LUT (slope, intercept) then maps stored values to
    output units; the display relationship is the same at every site after the chain.
    """
    top = 2**profile.bits_stored - 1
    stored = np.rint(np.clip(display, 0.0, 1.0) * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if profile.monochrome1 else stored


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _dicom(pixels: np.ndarray, profile: SiteProfile, patient: dict, series: int,
           study_uid: str, uid_key: str) -> Dataset:
    """An XA dataset with the modules a real export has (patient, study, series, equipment,
    image pixel, cine, modality LUT, VOI LUT, SOP common) and file meta."""
    sop_uid = _uid(uid_key, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XA_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Modality = "XA"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["patient_id"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = "M" if patient["sex"] == 1 else "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = patient["study_time"]
    ds.AccessionNumber = patient["accession"]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesInstanceUID = _uid(uid_key, "series")
    ds.SeriesNumber = series
    ds.InstanceNumber = 1
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.InstitutionName = "Synthetic Federation"
    ds.PositionerPrimaryAngle = round(float(patient["angles"][series % 4][0]), 1)
    ds.PositionerSecondaryAngle = round(float(patient["angles"][series % 4][1]), 1)
    ds.ImagerPixelSpacing = [0.2 * 512 / pixels.shape[-1]] * 2
    ds.KVP = 80
    ds.RadiationSetting = "GR"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if profile.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    if pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
        ds.FrameTime = 66.7
        ds.CineRate = 15
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    if profile.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = profile.rescale
        ds.RescaleType = "US"
    if profile.window:
        slope, intercept = profile.rescale or (1.0, 0.0)
        top = 2**profile.bits_stored - 1
        ds.WindowCenter = round(intercept + slope * 0.5 * top, 1)
        ds.WindowWidth = round(slope * 0.9 * top, 1)
    ds.PixelData = (pixels[0] if pixels.shape[0] == 1 else pixels).tobytes()
    return ds


# ---------------------------------------------------------------------------- outcome


def lesion_narrowing(vessels: list[Vessel]) -> float:
    """The diameter reduction of an image's tightest significant stenosis (0 when it has none):
    1 - the narrowest lumen over a lesion's segment relative to its calibre before the lesion."""
    narrowing = 0.0
    for v in vessels:
        for first, last, healthy in v.lesions:
            run = slice(first, last + 1)
            narrowing = max(narrowing, float(1.0 - np.min(v.radius[run] / healthy[run])))
    return narrowing


def follow_up_end(site: int) -> dt.date:
    """The data cut-off of site `site`: its patients' follow-up ends there (FOLLOW_UP_ENDS)."""
    return FOLLOW_UP_ENDS[site % len(FOLLOW_UP_ENDS)]


def outcome_risk(stenosis: float, age: float, sex: int) -> float:
    """The log hazard ratio of a patient (OUTCOME_EFFECTS)."""
    effects = OUTCOME_EFFECTS
    return effects["stenosis"] * stenosis + effects["age_decade"] * (age - 60.0) / 10.0 + effects["sex"] * sex


def draw_outcome(rng: np.random.Generator, risk: float, follow_up_days: int) -> tuple[int, int]:
    """(time in whole days, event) of a patient with log hazard ratio `risk`: a Weibull draw
    by inversion, T = scale * (-log U / exp(risk))^(1 / shape), censored at `follow_up_days`
    (the time is then the follow-up, event 0). An event on the day of the procedure counts as day 1."""
    event_time = OUTCOME_SCALE_DAYS * (-np.log(1.0 - rng.random()) / np.exp(risk)) ** (1.0 / OUTCOME_SHAPE)
    if event_time >= follow_up_days:
        return int(follow_up_days), 0
    return max(int(np.ceil(event_time)), 1), 1


def _outcome_cells(params: dict, site: int, index: int, patient: dict, narrowings: list[float]) -> dict:
    """The manifest's `time` and `event` of one patient, from its own random stream."""
    rng = np.random.default_rng([params["seed"], site, index, OUTCOME_STREAM])
    follow_up = (follow_up_end(site) - dt.date.fromisoformat(patient["acquired"])).days
    risk = outcome_risk(float(np.mean(narrowings)), patient["age"], patient["sex"])
    time, event = draw_outcome(rng, risk, follow_up)
    return {"time": time, "event": event}


# ------------------------------------------------------------------------- federation


def _patient(rng: np.random.Generator, site: int, index: int, confound: float,
             unlabelled_fraction: float, grades: bool = False) -> dict:
    """Label, clinical covariates and made-up demographics of one patient; with `grades`
    a diseased patient's label is its stenosis grade, moderate (1) or severe (2) alike."""
    patient_id = f"S{site}-P{index:04d}"
    label = int(rng.random() < site_prevalence(site, confound))
    if grades and label:
        label = 1 + int(rng.random() < 0.5)
    diseased = int(label > 0)
    # Mildly predictive, as in the clinic: with these effects a logistic regression on age
    # and sex reaches a population AUC of about 0.59 (version 2's 6 years and 0.08 gave
    # 0.67), so the imaging model has room to show what the images add.
    age = int(np.clip(rng.normal(61 + 3 * diseased, 10), 30, 92))
    sex = int(rng.random() < 0.62 + 0.04 * diseased)
    study = STUDY_START + dt.timedelta(days=int(rng.integers(0, STUDY_DAYS)))
    birth = study - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    split = split_of(patient_id)
    unlabelled = split == "train" and rng.random() < unlabelled_fraction
    return {
        "patient_id": patient_id,
        "name": f"SYNTH^S{site}P{index:04d}",
        "label": label,
        "manifest_label": None if unlabelled else label,
        "age": age,
        "sex": sex,
        "split": split,
        "study_date": study.strftime("%Y%m%d"),
        "acquired": study.isoformat(),
        "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        "birth_date": birth.strftime("%Y%m%d"),
        "accession": f"SYN{site}{index:06d}",
        "angles": rng.uniform(-40, 40, (4, 2)),
        "images": int(rng.integers(2, 5)),
    }


NULL_COVARIATE = "clin_null"  # --null-covariate: a clinical column that does not drive the label
NULL_STREAM = 7_919  # its own random stream: the images and every other value stay as without it


def null_covariate(seed: int, site: int, index: int) -> float:
    """A patient's `clin_null`: N(50, 10), rounded to 0.1, from a generator of its own
    (seeded by the federation seed, site, patient and NULL_STREAM), independent of the label
    and of everything `_patient` draws, so that the sensitivity analysis of a fused model has
    an input known to carry nothing (benchmarks/fusion_sensitivity.py)."""
    return round(float(np.random.default_rng([seed, site, index, NULL_STREAM]).normal(50.0, 10.0)), 1)


def _write_patient(site_dir: Path, site: int, index: int, params: dict) -> list[dict]:
    """Generate and write one patient's images; return its manifest rows."""
    rng = np.random.default_rng([params["seed"], site, index])
    patient = _patient(rng, site, index, params["confound"], params["unlabelled_fraction"],
                       params.get("grades", False))
    profile = site_profile(site)
    change = params.get("scanner_change")
    if change is not None and change["site"] == site and patient["acquired"] >= change["date"]:
        profile = replaced_scanner(profile)
    key = f"{params['key']}/{patient['patient_id']}"
    study_uid = _uid(key, "study")
    rows = []
    narrowings = []
    for k in range(patient["images"]):
        cine = k == 0 or (k > 1 and rng.random() < 0.5)  # image 0 cine, image 1 single
        frames = int(rng.integers(4, 7)) if cine else 1
        display, vessels = render_image_and_tree(rng, site, patient["label"], frames, params["image_size"], profile,
                                                 params.get("grades", False))
        narrowings.append(lesion_narrowing(vessels))
        ds = _dicom(encode_pixels(display, profile), profile, patient, k + 1, study_uid,
                    f"{key}/{k}")
        rel = f"images/{patient['patient_id']}_{k}.dcm"
        ds.save_as(site_dir / rel, enforce_file_format=True)
        row = {
            "patient_id": patient["patient_id"],
            "path": rel,
            "label": patient["manifest_label"],
            "clin_age": patient["age"],
            "clin_sex": patient["sex"],
        }
        if params.get("null_covariate"):
            row[NULL_COVARIATE] = null_covariate(params["seed"], site, index)
        row["acquired"] = patient["acquired"]
        if "mask_fraction" in params:
            row.update(_write_masks(site_dir, ds, display, vessels, profile, params["mask_fraction"],
                                    f"{key}/{k}", f"{patient['patient_id']}_{k}"))
        rows.append(row)
    if params.get("outcome"):
        cells = _outcome_cells(params, site, index, patient, narrowings)
        for row in rows:
            row.update(cells)
    return rows


def outlined_frames(display: np.ndarray, fraction: float) -> list[int]:
    """The frames of an image that carry a mask: round(fraction x frames), at least one, the
    best-opacified first (largest standard deviation of the display frame, the frame the
    reader's "peak" policy picks), returned in frame order. A radiologist outlines the
    frame where the vessels show best."""
    count = max(1, round(fraction * len(display)))
    contrast = display.reshape(len(display), -1).std(axis=1)
    return sorted(int(i) for i in np.argsort(-contrast, kind="stable")[:count])


def _write_masks(site_dir: Path, ds: Dataset, display: np.ndarray, vessels: list[Vessel],
                 profile: SiteProfile, fraction: float, uid_key: str, stem: str) -> dict[str, str]:
    """Write the image's label map for its outlined frames as a DICOM SEG (the manifest's
    `mask`) and one PNG per outlined frame beside it; the manifest cells of the row. Vessels
    behind the collimator's shutters are not in the image, so not in the mask."""
    frames = outlined_frames(display, fraction)
    labels = vessel_labels(vessels, display.shape[-1])
    labels[_shutter_mask(profile, display.shape[-1])] = 0
    rel = f"masks/{stem}.seg.dcm"
    write_seg(site_dir / rel, ds, np.repeat(labels[None], len(frames), axis=0), frames,
              (_uid(uid_key, "seg-series"), _uid(uid_key, "seg-sop")), series_number=100 + int(ds.SeriesNumber))
    for frame in frames:
        write_png(site_dir / f"masks/{stem}_f{frame}.png", labels)
    return {"mask": rel, "mask_frames": ";".join(str(f) for f in frames)}


def _write_patient_job(out: Path, params: dict, job: tuple[int, int]) -> list[dict]:
    site, index = job
    return _write_patient(out / f"site-{site}", site, index, params)


def _write_patients(out: Path, params: dict, progress: bool) -> dict[int, list[dict]]:
    """Write every patient's images, in parallel where the platform forks cheaply.

    Each patient has its own generator seeded by (seed, site, patient), so the files do
    not depend on the number of workers or on the order in which they finish.
    """
    for site in range(params["sites"]):
        (out / f"site-{site}" / "images").mkdir(parents=True)
        if "mask_fraction" in params:
            (out / f"site-{site}" / "masks").mkdir()
    jobs = [(s, i) for s in range(params["sites"]) for i in range(params["patients"])]
    work = partial(_write_patient_job, out, params)
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    rows: dict[int, list[dict]] = {s: [] for s in range(params["sites"])}
    bar = tqdm(total=len(jobs), desc="synthetic XA", unit="patient", disable=not progress)
    if workers > 1 and len(jobs) >= PARALLEL_MIN_PATIENTS and _FORK in mp.get_all_start_methods():
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(_FORK)) as pool:
            results = pool.map(work, jobs, chunksize=4)
            for (site, _), patient_rows in zip(jobs, results):
                rows[site].extend(patient_rows)
                bar.update()
    else:
        for site, index in jobs:
            rows[site].extend(work((site, index)))
            bar.update()
    bar.close()
    return rows


def _site_summary(rows: list[dict], profile: SiteProfile) -> dict:
    patients = {r["patient_id"]: r["label"] for r in rows}
    summary = {
        "images": len(rows),
        "patients": len(patients),
        "labelled_patients": sum(v is not None for v in patients.values()),
        "positive_patients": sum(v is not None and v >= 1 for v in patients.values()),
        "labelled_images": sum(r["label"] is not None for r in rows),
        "positive_images": sum(r["label"] is not None and r["label"] >= 1 for r in rows),
        "manufacturer": profile.manufacturer,
        "model": profile.model,
        "bits_stored": profile.bits_stored,
        "photometric": "MONOCHROME1" if profile.monochrome1 else "MONOCHROME2",
        "rescale": list(profile.rescale) if profile.rescale else None,
    }
    if any("event" in r for r in rows):
        outcomes = {r["patient_id"]: r["event"] for r in rows}
        summary["events"] = sum(outcomes.values())
        summary["censored"] = len(outcomes) - summary["events"]
    if any("mask" in r for r in rows):
        summary["masked_images"] = sum(bool(r["mask"]) for r in rows)
        summary["masked_frames"] = sum(len(r["mask_frames"].split(";")) for r in rows if r["mask"])
    return summary


def _cached(out: Path, params: dict) -> dict | None:
    """The existing federation.json if it was made with these parameters and is complete."""
    path = out / FEDERATION_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if content.get("parameters") != params:
        return None
    if not all((out / f"site-{i}" / MANIFEST_NAME).is_file() for i in range(params["sites"])):
        return None
    return content


def synthetic_record(sites: list[str]) -> dict | None:
    """The federation.json of the federation `sites` belong to, when every site folder was
    written by `fedir data synth`: all in one folder holding federation.json, each named in
    its `sites`. None for any other federation (a real one, or synthetic sites copied
    elsewhere without their record), or when the record cannot be read."""
    roots = {Path(site).resolve().parent for site in sites}
    if not sites or len(roots) != 1 or not (path := next(iter(roots)) / FEDERATION_FILE).is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(content, dict) or not isinstance(content.get("parameters"), dict):
        return None
    named = content.get("sites") or {}
    return content if all(Path(site).resolve().name in named for site in sites) else None


def _clear(out: Path, force: bool) -> None:
    """Remove a previous federation's site folders; refuse to touch unknown content."""
    ours = (out / FEDERATION_FILE).is_file()
    sites = sorted(p for p in out.glob("site-*") if p.is_dir())
    if sites and not ours and not force:
        raise OutputExists(
            f"{out} holds site folders but no {FEDERATION_FILE}; not overwriting (use force)"
        )
    for site_dir in sites:
        shutil.rmtree(site_dir)
    (out / FEDERATION_FILE).unlink(missing_ok=True)


def check_scanner_change(change: tuple[int, str], sites: int) -> tuple[int, str]:
    """(site, ISO date) of a scanner change, refused (ValueError) when the site does not exist or
    the date is not YYYY-MM-DD."""
    site, date = int(change[0]), str(change[1])
    if not 0 <= site < sites:
        raise ValueError(f"scanner change at site {site}: the federation has sites 0..{sites - 1}")
    try:
        parsed = dt.date.fromisoformat(date)
    except ValueError:
        raise ValueError(f"scanner change date {date!r} is not YYYY-MM-DD") from None
    if parsed.isoformat() != date:
        raise ValueError(f"scanner change date {date!r} is not YYYY-MM-DD")
    return site, date


def generate_federation(out: str | Path, sites: int = 4, patients: int = 80, seed: int = 0,
                        confound: float = 0.0, unlabelled_fraction: float = 0.7,
                        image_size: int = 256, force: bool = False,
                        progress: bool = True, mask_fraction: float | None = None,
                        scanner_change: tuple[int, str] | None = None, grades: bool = False,
                        outcome: bool = False, null_covariate: bool = False) -> dict:
    """Write (or reuse) a synthetic XA federation under `out`; return its federation.json.

    `patients` is per site. The returned dict holds the parameters and, per site, counts of
    images, patients, labelled and positive patients, and the scanner description.

    `mask_fraction` None writes no masks (and the files of earlier versions, byte for byte).
    A number in [0, 1] writes, for round(mask_fraction x frames) frames of every image and
    at least one (`outlined_frames`; so 0 gives one outlined frame per image, a cine run
    included, and 1 every frame), the exact label map (`vessel_labels`: 1 vessel, 2
    stenosis) as a DICOM SEG named in the manifest's `mask` column, with `mask_frames`
    naming the outlined frames (0-based), and as PNG files beside it (simulations/mask_files.py).
    Masks are drawn for every patient, labelled or not: segmentation labels are per frame.

    `scanner_change` (site index, ISO date "YYYY-MM-DD"): that site's images acquired on or
    after the date come from `replaced_scanner` (see the module docstring); None: none.

    `grades`: the label is the stenosis grade, 0 none, 1 moderate (a 50-70% narrowing), 2
    severe (70-95%), for a `task.classes = 3` study; False writes the binary label (and the
    files of earlier versions, byte for byte). Positive counts then count either grade.

    `outcome`: every row also carries its patient's `time` (days) and `event` (see the module
    docstring: driven by the stenosis burden, age and sex, censored at the site's data cut-off),
    for a `task.kind = "survival"` study; the pixels are unchanged, and False writes none (the
    files of earlier versions, byte for byte). Each site's summary then counts `events` and
    `censored` patients.

    `null_covariate`: every row also carries `clin_null` (NULL_COVARIATE, the function
    null_covariate: drawn apart from the label and the images); False writes the files of
    earlier versions, byte for byte.
    """
    if sites < 1 or patients < 1:
        raise BadParameter(f"sites and patients (--sites, --patients) must be at least 1, got {sites} and {patients}")
    if not 0.0 <= confound <= 1.0:
        raise BadParameter(f"confound (--confound) must be in [0, 1], got {confound}")
    if not 0.0 <= unlabelled_fraction <= 1.0:
        raise BadParameter(f"unlabelled_fraction (--unlabelled) must be in [0, 1], got {unlabelled_fraction}")
    if image_size < 16:
        raise BadParameter(f"image_size (--image-size) must be at least 16, got {image_size}")
    if mask_fraction is not None and not 0.0 <= mask_fraction <= 1.0:
        raise BadParameter(f"mask_fraction (--mask-fraction) must be in [0, 1], got {mask_fraction}")
    if scanner_change is not None:
        scanner_change = check_scanner_change(scanner_change, sites)
    out = Path(out)
    params = {
        "generator_version": GENERATOR_VERSION,
        "sites": int(sites),
        "patients": int(patients),
        "seed": int(seed),
        "confound": float(confound),
        "unlabelled_fraction": float(unlabelled_fraction),
        "image_size": int(image_size),
    }
    if mask_fraction is not None:
        params["mask_fraction"] = float(mask_fraction)
    if scanner_change is not None:
        params["scanner_change"] = {"site": scanner_change[0], "date": scanner_change[1]}
    if grades:
        params["grades"] = True
    if outcome:
        params["outcome"] = True
    if null_covariate:
        params["null_covariate"] = True
    if not force and (cached := _cached(out, params)) is not None:
        return cached
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, force)
    params_key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    work = dict(params, key=params_key)
    rows = _write_patients(out, work, progress)
    summary = {}
    for site in range(sites):
        write_manifest(out / f"site-{site}", rows[site])
        summary[f"site-{site}"] = _site_summary(rows[site], site_profile(site))
    content = {"parameters": params, "sites": summary}
    (out / FEDERATION_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return content
