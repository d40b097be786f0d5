"""Segmentation metrics at a site and their pooling at the server, from aggregates only.

At a site (`site_segmentation_metrics`), for every masked image of a split:

- Dice per image: MONAI `DiceMetric(include_background=False, reduction="none")` over the
  foreground classes (vessel, stenosis), averaged over the classes the reference mask holds
  (MONAI's `ignore_empty`: a class absent from the reference gives NaN, not a free 1). An
  image whose reference has no foreground at all has no Dice; it is counted
  (`n_no_foreground`) and left out.
- HD95 per image: MONAI `HausdorffDistanceMetric(percentile=95)` in pixels of the model's
  input size, averaged over the classes where both reference and prediction have
  foreground; an image whose prediction misses every reference class has no HD95 (MONAI
  gives inf/NaN there) and is counted (`n_no_hd95`).
- Dice per class (`dice_vessel`, `dice_stenosis`): the same per-image, per-class MONAI Dice
  before the mean over classes; an image whose reference lacks the class has none for it,
  and a patient without one for any image is left out of that class's mean (its
  `n_<class>_patients` counts the rest). Aggregated, bootstrapped and pooled as `dice`.
- Per patient: the mean over the patient's images (a patient is the unit the CI resamples;
  the images of one patient are not independent). The site's Dice and HD95 are the means
  over its patients; their 95% CIs are percentile intervals of `n_boot` patient-bootstrap
  replicates (fedir.metrics' percentile rule).
- What leaves the site: counts, the two means with CIs, the sums and sums of squares of
  the per-patient values (for pooling), and a histogram of per-image Dice over DICE_BINS
  fixed bins of [0, 1]. Nothing per patient or per image.

At the server (`pooled_segmentation_metrics`): the patient-weighted mean over the sites
(sum of per-patient values / patients), and a normal-approximation 95% CI whose standard
error comes from the pooled sum of squares (the patients treated as one sample: the
per-patient values are not available to a bootstrap), clipped to [0, 1] for Dice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from fedir.metrics import CONFIDENCE, NO_BOOTSTRAP, _percentile_ci

FOREGROUND = (1, 2)  # vessel, stenosis (fedir.client.masks.MASK_LABELS)
N_CLASSES = 3
DICE_BINS = 10  # fixed bins of per-image Dice over [0, 1]
FOREGROUND_NAMES = ("vessel", "stenosis")  # the classes of FOREGROUND, in order
CLASS_DICE = tuple(f"dice_{name}" for name in FOREGROUND_NAMES)  # Dice of each foreground class
SEG_COUNTS = ("n", "n_patients", "n_no_foreground", "n_no_hd95", "n_hd95_patients",
              *(f"n_{name}_patients" for name in FOREGROUND_NAMES))
SEG_SCALARS = ("dice", "hd95", *CLASS_DICE)  # each with `<name>_ci`
DICE_HIST = "dice_hist"
SEG_INT_VECTORS = (DICE_HIST,)
SEG_FLOAT_VECTORS = ("sums",)  # over patients: [dice, dice^2, hd95, hd95^2, then each CLASS_DICE and its square]
# Upper bounds of the foreground-fraction bins (the data card's, fedir.client.datacard, and the
# foreground-by-site test's, fedir.strategies.segmentation_bias); bin 0 is exactly 0 (no
# foreground pixel) and the last is >= 0.5. A vessel tree covers about 5-20% of a frame.
FOREGROUND_EDGES = (0.01, 0.05, 0.1, 0.2, 0.5)
FOREGROUND_BIN_NAMES = ("0", *(f"{low:g}-{high:g}" for low, high in zip((0.0, *FOREGROUND_EDGES), FOREGROUND_EDGES)),
                        f">={FOREGROUND_EDGES[-1]:g}")


def foreground_bin(fraction: float) -> int:
    """The index in FOREGROUND_BIN_NAMES of a foreground fraction in [0, 1]."""
    if fraction <= 0.0:
        return 0
    return 1 + int(np.searchsorted(FOREGROUND_EDGES, fraction, side="right"))


def per_image_metrics(target: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Dice, HD95) per image of (N, H, W) reference and predicted label maps; NaN where not
    defined (see the module docstring)."""
    dice, hd = per_image_class_metrics(target, predicted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN mean: NaN is the intended answer
        return np.nanmean(dice, axis=1), np.nanmean(hd, axis=1)


def per_image_class_metrics(target: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Dice, HD95) per image and foreground class, each (N, len(FOREGROUND)), of (N, H, W)
    reference and predicted label maps; NaN where not defined (see the module docstring)."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    n = len(target)
    if n == 0:
        return np.zeros((0, len(FOREGROUND))), np.zeros((0, len(FOREGROUND)))
    y = one_hot(torch.as_tensor(np.asarray(target), dtype=torch.int64).reshape(n, 1, *target.shape[-2:]),
                N_CLASSES)
    p = one_hot(torch.as_tensor(np.asarray(predicted), dtype=torch.int64).reshape(n, 1, *target.shape[-2:]),
                N_CLASSES)
    # MONAI warns of an empty class: NaN is the intended answer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (RuntimeWarning, UserWarning, FutureWarning))
        # (N, 2) per image and foreground class; both return a tensor for tensor inputs
        dice = cast(torch.Tensor, DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, y)).numpy()
        hd = cast(torch.Tensor, HausdorffDistanceMetric(include_background=False, percentile=95,
                                                        reduction="none")(p, y)).numpy()
        return dice.astype(float), np.where(np.isfinite(hd), hd, np.nan).astype(float)


def _per_patient(values: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """The mean of each patient's defined values (patients without one left out)."""
    keep = np.isfinite(values)
    groups = np.unique(patients[keep])
    return np.array([values[keep & (patients == g)].mean() for g in groups], dtype=float)


def _bootstrap_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float] | None:
    if n_boot <= 0 or len(values) < 2:
        return None
    draws = rng.integers(len(values), size=(n_boot, len(values)))
    return _percentile_ci(values[draws].mean(axis=1))


def site_segmentation_metrics(target: np.ndarray, predicted: np.ndarray, patients: Sequence[str], *,
                              n_boot: int, seed: int) -> dict[str, Any]:
    """One split's aggregates (module docstring) of (N, H, W) reference and predicted labels."""
    target = np.asarray(target).reshape(len(patients), *np.shape(target)[-2:])
    predicted = np.asarray(predicted).reshape(target.shape)
    who = np.asarray(list(patients), dtype=object)
    class_dice, class_hd = per_image_class_metrics(target, predicted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN mean: NaN is the intended answer
        dice, hd95 = np.nanmean(class_dice, axis=1), np.nanmean(class_hd, axis=1)
    patient_dice, patient_hd = _per_patient(dice, who), _per_patient(hd95, who)
    patient_class = {name: _per_patient(class_dice[:, c], who) for c, name in enumerate(FOREGROUND_NAMES)}
    rng = np.random.default_rng(seed)
    reasons: dict[str, str] = {}
    out: dict[str, Any] = {
        "n": int(np.isfinite(dice).sum()), "n_patients": len(patient_dice),
        "n_no_foreground": int((~np.isfinite(dice)).sum()), "n_no_hd95": int((np.isfinite(dice) & ~np.isfinite(hd95)).sum()),
        "n_hd95_patients": len(patient_hd),
        **{f"n_{name}_patients": len(values) for name, values in patient_class.items()},
    }
    scalars = {"dice": patient_dice, "hd95": patient_hd,
               **{f"dice_{name}": values for name, values in patient_class.items()}}
    for name, values in scalars.items():
        out[name] = float(values.mean()) if len(values) else None
        out[f"{name}_ci"] = _bootstrap_ci(values, n_boot, rng)
        if out[name] is None:
            reasons[name] = "not computed: no patient with a defined value"
        elif out[f"{name}_ci"] is None:
            reasons[f"{name}_ci"] = NO_BOOTSTRAP if n_boot <= 0 else "not computed: fewer than 2 patients"
    out["sums"] = [float(v) for name in SEG_SCALARS for v in (scalars[name].sum(), (scalars[name] ** 2).sum())]
    out[DICE_HIST] = np.histogram(dice[np.isfinite(dice)], bins=DICE_BINS, range=(0.0, 1.0))[0].astype(int).tolist()
    out["reasons"] = reasons
    return out


def _normal_ci(total: float, squares: float, n: int, clip: tuple[float, float]) -> tuple[float | None, list[float] | None]:
    if n == 0:
        return None, None
    mean = total / n
    if n < 2:
        return mean, None
    from scipy.stats import norm

    var = max(squares - n * mean ** 2, 0.0) / (n - 1)
    half = float(norm.ppf(0.5 + CONFIDENCE / 2)) * (var / n) ** 0.5
    return mean, [max(clip[0], mean - half), min(clip[1], mean + half)]


def pooled_segmentation_metrics(per_site: Mapping[str, dict], **_: Any) -> dict[str, Any]:
    """The sites' aggregates pooled (module docstring): patient-weighted means, normal CIs."""
    sites = list(per_site.values())
    counts = {name: sum(int(m[name]) for m in sites) for name in SEG_COUNTS}
    sums = np.sum([m["sums"] for m in sites], axis=0) if sites else np.zeros(2 * len(SEG_SCALARS))
    patients = {"dice": "n_patients", "hd95": "n_hd95_patients",
                **{f"dice_{name}": f"n_{name}_patients" for name in FOREGROUND_NAMES}}
    out: dict[str, Any] = {**counts}
    reasons = {}
    for i, name in enumerate(SEG_SCALARS):
        clip = (0.0, np.inf) if name == "hd95" else (0.0, 1.0)
        out[name], out[f"{name}_ci"] = _normal_ci(float(sums[2 * i]), float(sums[2 * i + 1]), counts[patients[name]], clip)
        if out[name] is None and name != "hd95":
            reasons[name] = "not computed: no site has a patient with a Dice" + ("" if name == "dice" else " of this class")
    hist = np.sum([m[DICE_HIST] for m in sites], axis=0).astype(int).tolist() if sites else [0] * DICE_BINS
    return {**out, "sums": sums.tolist(), DICE_HIST: hist, "reasons": reasons}
