"""Evaluation aggregates: computed at a site, pooled at the server.

Binary task, label 1 = disease, scores = the model's positive-class probability.
A site never sends per-patient scores. What leaves it is :func:`site_metrics`: point
estimates with patient-level bootstrap CIs, the confusion counts at a threshold, two
fixed-bin score histograms (one per label) and the scores' sum per bin (calibration),
per image and per patient. The server pools those with :func:`pooled_metrics` (the
pooled AUC exact up to cross-site pairs that share a bin, with the bound of that error),
chooses the decision threshold on the validation patients' histograms
(``fedir.strategies.thresholds``), and the bias analysis (``fedir.strategies.bias``)
compares the pooled AUC with the within-site ones.

Every value returned is a plain ``int``/``float``/``list``/``None`` (never a numpy
type, never NaN), so the dicts serialise to JSON and to Flower records unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.stats import binomtest

DEFAULT_BINS = 50  # eval.hist-bins' default (fedir.config)
CONFIDENCE = 0.95
# A percentile CI from a minority of the resamples describes a different population
# (the resamples that happened to contain both classes), so below this we give none.
MIN_USABLE_FRACTION = 0.5

# ---- the metric names: defined here once, every other module imports them ---------------
# Proportions at the decision threshold, computed from the confusion counts.
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity")
# Every scalar metric a site (and the pool) reports, each with its 95% CI as `<name>_ci`.
SCALAR_METRICS = ("auc", *THRESHOLD_METRICS)
CONFUSION_COUNTS = ("tp", "tn", "fp", "fn")
# The counts of one evaluation: images, patients, positive images, the confusion matrix.
COUNTS = ("n", "n_patients", "positives", *CONFUSION_COUNTS)
# Per-class score counts in fixed equal bins on [0, 1] (site_metrics's `bins`), summable over sites.
HISTOGRAMS = ("hist_neg", "hist_pos")
# The sum of the scores in each of those bins (both classes): with the counts, the exact mean
# predicted score of a bin, which the reliability table and the ECE need.
SCORE_SUMS = "hist_score_sum"
# What a bootstrap resample must contain for each metric to be defined on it.
_RESAMPLE_NEEDS = {
    "auc": "both classes",
    "accuracy": "an image",
    "sensitivity": "a positive image",
    "specificity": "a negative image",
}


NO_BOOTSTRAP = ("not computed: no bootstrap (eval.bootstrap = 0, or the validation split, "
                "whose point estimates alone are used)")


def site_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    patients: Sequence[str],
    *,
    n_boot: int = 500,
    seed: int = 0,
    threshold: float = 0.5,
    bins: int = DEFAULT_BINS,
) -> dict:
    """Test-set aggregates of one site, safe to send to the server.

    A score >= ``threshold`` is a positive prediction. CIs are 95% percentile
    bootstrap intervals that resample *patients*, not images: a patient's images share
    anatomy, scanner and disease state, so treating them as independent would make the
    intervals too narrow. Each resample draws as many patients as the site has, with
    replacement, and carries all their images. A resample without both classes is
    skipped for AUC (and one without positives/negatives for sensitivity/specificity);
    when fewer than half of the resamples are usable the CI is None, with a reason.

    ``per_patient`` holds the same metrics with one row per patient (:func:`patient_scores`:
    the mean of a patient's image scores, the patient's label): the primary metrics where
    labels are per patient, since an image-level AUC weighs a patient by their number of
    images. It is None, with a reason, when a patient's images carry both labels.

    ``hist_score_sum`` and ``ece`` describe calibration (:func:`calibration`): the scores'
    sum per histogram bin, so that a bin's mean predicted score is exact, and the expected
    calibration error over those bins.

    What the histograms reveal grows with ``bins``: a bin holding one patient places that
    patient's score within 1/bins, and ``hist_score_sum`` then gives it exactly. That is
    the privacy cost of finer bins and of calibration; nothing else per patient leaves
    the site, and no identifier ever does.

    Returns the keys ``n, n_patients, positives, auc, accuracy, sensitivity,
    specificity, ece, *_ci, tp, tn, fp, fn, hist_neg, hist_pos, hist_score_sum,
    per_patient, reasons``; ``reasons`` explains every None.
    """
    out = _image_metrics(labels, scores, patients, n_boot=n_boot, seed=seed, threshold=threshold, bins=bins)
    try:
        ids, patient_y, patient_s = patient_scores(labels, scores, patients)
    except ValueError as exc:
        out["reasons"]["per_patient"] = str(exc)
        return _order({**out, "per_patient": None})
    per_patient = _image_metrics(patient_y, patient_s, ids, n_boot=n_boot, seed=seed, threshold=threshold, bins=bins)
    return _order({**out, "per_patient": per_patient})


def patient_scores(labels: np.ndarray, scores: np.ndarray, patients: Sequence[str]
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One row per patient: (patient ids, label, mean score over the patient's images).

    The mean is the declared rule: every image of a study counts alike, and it keeps a
    patient's score a probability. ValueError when a patient's images carry both labels
    (labels are then per image, and so must be the metrics).
    """
    y, s, patient_index, n_patients = _validate(labels, scores, patients)
    ids = np.unique(np.asarray(patients).astype(str).reshape(-1))
    count = np.bincount(patient_index, minlength=n_patients)
    positives = np.bincount(patient_index, weights=y.astype(float), minlength=n_patients)
    mixed = int(np.sum((positives > 0) & (positives < count)))
    if mixed:
        raise ValueError(f"{mixed} patient(s) have images of both labels: labels are per image, "
                         "so there is no per-patient metric")
    mean = np.bincount(patient_index, weights=s, minlength=n_patients) / np.maximum(count, 1)
    return ids.tolist(), (positives > 0).astype(int), np.clip(mean, 0.0, 1.0)


def _image_metrics(labels, scores, patients, *, n_boot: int, seed: int, threshold: float, bins: int) -> dict:
    """site_metrics without ``per_patient``: one row per image (or per patient, when each
    patient is given once)."""
    y, s, patient_index, n_patients = _validate(labels, scores, patients)
    pred = s >= threshold
    counts = _confusion(y, pred)
    hist_neg, hist_pos, score_sum = _histograms(y, s, bins)
    out: dict = {
        "n": int(y.size),
        "n_patients": n_patients,
        "positives": int(y.sum()),
        **counts,
        "hist_neg": hist_neg,
        "hist_pos": hist_pos,
        SCORE_SUMS: score_sum,
    }
    points, reasons = _point_estimates(y, s, counts)
    cis, ci_reasons = _patient_bootstrap_cis(y, s, pred, patient_index, n_patients, points, reasons, n_boot, seed)
    out.update(points)
    out.update(cis)
    out["ece"] = calibration(hist_neg, hist_pos, score_sum)["ece"]
    if out["ece"] is None:
        reasons["ece"] = "no test images"
    out["reasons"] = {**reasons, **ci_reasons}
    return _order(out)


def auc_from_histograms(hist_neg: Sequence[float], hist_pos: Sequence[float]) -> float | None:
    """Mann-Whitney AUC from per-class counts in the same ordered bins.

    Pairs in different bins are ordered by their bins; pairs in the same bin count 1/2,
    as tied scores do. This is the exact AUC of the binned scores; it differs from the
    AUC of the raw scores by at most half the fraction of (negative, positive) pairs
    that share a bin. Counts may be non-integer (weights). None when either class is
    empty.
    """
    neg = np.asarray(hist_neg, dtype=float)
    pos = np.asarray(hist_pos, dtype=float)
    if neg.shape != pos.shape or neg.ndim != 1:
        raise ValueError(f"histograms must be 1-D and of equal length, got {neg.shape} and {pos.shape}")
    return _none_if_nan(histogram_aucs(neg, pos))


def pooled_metrics(per_site: Mapping[str, dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Federation-level test metrics from what the sites sent (histograms, confusion counts).

    ``auc`` is :func:`pooled_auc_exact`: as exact as the aggregates allow. Every site's own
    AUC is exact (it had its scores), so the within-site (negative, positive) pairs are
    counted exactly; only the pairs across sites are ordered by the histograms, and of
    those only the pairs sharing a bin are uncertain (counted 1/2).
    ``auc_binning_error`` bounds the remaining error: half the share of all pairs that
    are cross-site and share a bin. Its CI is a percentile bootstrap that resamples each
    site's histogram per class (multinomial, the site's class count fixed), each replicate
    shifted by the observed difference between the exact and the binned pooled AUC.
    Accuracy, sensitivity and specificity come from the summed tp/tn/fp/fn with Wilson 95%
    intervals. ``ece`` is the calibration error of the summed counts and score sums
    (:func:`calibration`), None with a reason when a site sent no score sums.

    At the image level these CIs treat images as independent: the patient structure does
    not leave the sites, so they are narrower than patient-level ones. ``per_patient``
    pools the sites' per-patient aggregates the same way; there a histogram count is a
    patient, so the bootstrap and the Wilson intervals count patients, the right unit where
    labels are per patient. It is None, with a reason, when a site has none.

    Returns the keys of :func:`site_metrics` with ``auc_binning_error``, ``n`` and
    ``n_patients`` summed.
    """
    out = _pooled_image_metrics(per_site, n_boot=n_boot, seed=seed)
    missing = sorted(site for site, entry in per_site.items() if not entry.get("per_patient"))
    if not per_site or missing:
        out["reasons"]["per_patient"] = ("no sites reported test metrics" if not per_site else
                                         f"no per-patient metrics from {', '.join(missing)}")
        return _order({**out, "per_patient": None})
    by_patient = {site: entry["per_patient"] for site, entry in per_site.items()}
    return _order({**out, "per_patient": _pooled_image_metrics(by_patient, n_boot=n_boot, seed=seed)})


def pooled_auc_exact(per_site: Mapping[str, dict]) -> tuple[float | None, float | None]:
    """(pooled AUC, bound of its error) from the sites' AUCs and histograms.

    The pooled Mann-Whitney count is the sum over sites of the exact within-site wins
    (``auc_s * pos_s * neg_s``) plus the cross-site pairs, ordered by their bins (a pair
    sharing a bin counts 1/2, so it is off by at most 1/2). A site whose AUC is missing
    while it has both classes contributes its binned within-site pairs instead, and its
    tied pairs count in the bound. The bound is the uncertain pairs' share over 2; the
    true pooled AUC of the raw scores lies within it. (None, None) when the pool lacks a
    class.
    """
    neg, pos = stack_histograms(per_site)
    pairs = float(neg.sum() * pos.sum())
    if pairs == 0:
        return None, None
    binned_wins = float(histogram_aucs(neg.sum(axis=0), pos.sum(axis=0))) * pairs
    site_pairs = neg.sum(axis=1) * pos.sum(axis=1)
    with np.errstate(invalid="ignore"):
        site_binned = np.nan_to_num(histogram_aucs(neg, pos)) * site_pairs
    aucs = [entry.get("auc") for entry in per_site.values()]
    exact = np.array([a is not None and p > 0 for a, p in zip(aucs, site_pairs)])
    site_exact = np.array([0.0 if a is None else float(a) for a in aucs]) * site_pairs
    wins = binned_wins - float(site_binned[exact].sum()) + float(site_exact[exact].sum())
    tied_pooled = float(np.sum(neg.sum(axis=0) * pos.sum(axis=0)))
    tied_exact_sites = float(np.sum(neg[exact] * pos[exact]))
    return float(np.clip(wins / pairs, 0.0, 1.0)), 0.5 * (tied_pooled - tied_exact_sites) / pairs


def _pooled_image_metrics(per_site: Mapping[str, dict], *, n_boot: int, seed: int) -> dict:
    """pooled_metrics without ``per_patient``."""
    site_neg, site_pos = stack_histograms(per_site)
    hist_neg = [int(c) for c in site_neg.sum(axis=0)]
    hist_pos = [int(c) for c in site_pos.sum(axis=0)]
    counts = {key: sum(int(site[key]) for site in per_site.values()) for key in CONFUSION_COUNTS}
    out: dict = {
        "n": sum(int(site["n"]) for site in per_site.values()),
        "n_patients": sum(int(site["n_patients"]) for site in per_site.values()),
        "positives": sum(int(site["positives"]) for site in per_site.values()),
        **counts,
        "hist_neg": hist_neg,
        "hist_pos": hist_pos,
    }
    reasons: dict[str, str] = {}
    auc, out["auc_binning_error"] = pooled_auc_exact(per_site) if per_site else (None, None)
    out["auc"], out["auc_ci"] = auc, None
    if auc is None:
        reasons["auc"] = reasons["auc_ci"] = _pooled_class_reason(per_site, sum(hist_neg), sum(hist_pos))
    else:
        # each site's class histograms redrawn, then summed: the sampling noise of every
        # site's test set, with the federation's composition held as observed; the binned
        # replicates carry the exact point's offset from the binned one
        offset = auc - float(histogram_aucs(site_neg.sum(axis=0), site_pos.sum(axis=0)))
        if n_boot < 1:
            reasons["auc_ci"] = NO_BOOTSTRAP
        else:
            neg, pos = resample_histograms(site_neg, site_pos, n_boot, np.random.default_rng(seed))
            replicates = histogram_aucs(neg.sum(axis=1), pos.sum(axis=1)) + offset
            out["auc_ci"] = _percentile_ci(np.clip(replicates, 0.0, 1.0))
    for name in THRESHOLD_METRICS:
        successes, trials = rate_counts(name, counts)
        out[name], out[f"{name}_ci"] = wilson(successes, trials)
        if trials == 0:
            reasons[name] = reasons[f"{name}_ci"] = _pooled_empty_reason(name, per_site)
    without_sums = sorted(site for site, entry in per_site.items() if entry.get(SCORE_SUMS) is None)
    if without_sums or not per_site:
        out["ece"] = None
        reasons["ece"] = (f"no score sums from {', '.join(without_sums)}" if without_sums
                          else "no sites reported test metrics")
    else:
        out[SCORE_SUMS] = [float(v) for v in np.sum([entry[SCORE_SUMS] for entry in per_site.values()], axis=0)]
        out["ece"] = calibration(hist_neg, hist_pos, out[SCORE_SUMS])["ece"]
        if out["ece"] is None:
            reasons["ece"] = "no test images at any site"
    out["reasons"] = reasons
    return _order(out)


# ---- site_metrics helpers -------------------------------------------------------------


def _validate(labels, scores, patients) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Check the inputs; return labels (int), scores (float), patient index per image, #patients."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    p = np.asarray(patients).astype(str).reshape(-1)
    if not (y.size == s.size == p.size):
        raise ValueError(f"labels, scores and patients differ in length: {y.size}, {s.size}, {p.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(s).all() or (s.size and (s.min() < 0 or s.max() > 1)):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    uniq, patient_index = np.unique(p, return_inverse=True)
    return y.astype(int), s, patient_index.reshape(-1), int(uniq.size)


def _confusion(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    return {
        "tp": int(np.sum(pred & (y == 1))),
        "tn": int(np.sum(~pred & (y == 0))),
        "fp": int(np.sum(pred & (y == 0))),
        "fn": int(np.sum(~pred & (y == 1))),
    }


def bin_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the fixed equal bins on [0, 1]. Bin i holds the scores in
    [edge i, edge i+1) (the last also 1.0), so "score >= edge k" is exactly "in bin k or above"."""
    return np.linspace(0.0, 1.0, bins + 1)


def _histograms(y: np.ndarray, s: np.ndarray, bins: int) -> tuple[list[int], list[int], list[float]]:
    """Counts per class in fixed bins on [0, 1] (fixed so that sites' histograms add up),
    and the sum of all scores in each bin."""
    edges = bin_edges(bins)
    neg, _ = np.histogram(s[y == 0], bins=edges)
    pos, _ = np.histogram(s[y == 1], bins=edges)
    total, _ = np.histogram(s, bins=edges, weights=s)
    return [int(c) for c in neg], [int(c) for c in pos], [float(v) for v in total]


def calibration(hist_neg: Sequence[float], hist_pos: Sequence[float], hist_score_sum: Sequence[float]) -> dict:
    """Reliability by score bin and the expected calibration error, from the aggregates.

    ``bins`` lists every non-empty bin as ``{"low", "high", "count", "positives",
    "mean_score", "observed"}`` (the counts are patients in a per-patient set): a calibrated
    model's mean score matches the observed rate of positives in each bin. ``ece`` is
    ``sum_b (count_b / N) |mean_score_b - observed_b|`` over those bins, exact for these
    bins (it needs only counts and score sums, so pooled sites' is exact too); None
    without any score. Binned ECE depends on the bins and is biased upward on small sets
    (a bin of one patient is off by at least min(s, 1 - s)): compare ECEs at equal bins
    and read them with the counts beside them.
    """
    neg = np.asarray(hist_neg, dtype=float)
    pos = np.asarray(hist_pos, dtype=float)
    total = np.asarray(hist_score_sum, dtype=float)
    if not (neg.shape == pos.shape == total.shape) or neg.ndim != 1:
        raise ValueError(f"calibration needs three 1-D vectors of one length, got {neg.shape}, {pos.shape}, {total.shape}")
    count = neg + pos
    edges = bin_edges(neg.size)
    n = float(count.sum())
    rows = []
    ece = 0.0
    for i in np.flatnonzero(count > 0):
        mean, observed = total[i] / count[i], pos[i] / count[i]
        ece += count[i] / n * abs(mean - observed)
        rows.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": int(count[i]),
                     "positives": int(pos[i]), "mean_score": float(mean), "observed": float(observed)})
    return {"ece": float(ece) if n > 0 else None, "bins": rows}


def _point_estimates(y: np.ndarray, s: np.ndarray, counts: Mapping[str, int]) -> tuple[dict, dict[str, str]]:
    """AUC (exact, ties count 1/2) and the threshold rates; a reason for each that is undefined."""
    positives = int(y.sum())
    negatives = int(y.size - positives)
    classes = f"({negatives} negatives, {positives} positives)"
    points: dict = {}
    reasons: dict[str, str] = {}
    if y.size == 0:
        reasons.update(dict.fromkeys(SCALAR_METRICS, "no test images"))
    elif positives == 0 or negatives == 0:
        reasons["auc"] = f"only one class in the test set {classes}"
    else:
        points["auc"] = _exact_auc(y, s)
    for name in THRESHOLD_METRICS:
        successes, trials = rate_counts(name, counts)
        if trials:
            points[name] = successes / trials
        elif name not in reasons:
            missing = "positive" if name == "sensitivity" else "negative"
            reasons[name] = f"no {missing} images in the test set {classes}"
    return {name: points.get(name) for name in SCALAR_METRICS}, reasons


def _exact_auc(y: np.ndarray, s: np.ndarray) -> float:
    """The Mann-Whitney AUC of the raw scores, grouped by distinct score: the value of
    sklearn's ``roc_auc_score`` (ties count 1/2) by the formula the bootstrap replicates
    use, without sklearn's input checks, which cost more than the AUC on a site's test set."""
    distinct, index = np.unique(s, return_inverse=True)
    neg, pos = (np.bincount(index[y == label], minlength=distinct.size) for label in (0, 1))
    return float(histogram_aucs(neg.astype(float), pos.astype(float)))


def rate_counts(name: str, counts: Mapping[str, int]) -> tuple[int, int]:
    """(successes, trials) of a threshold metric from confusion counts."""
    tp, tn, fp, fn = counts["tp"], counts["tn"], counts["fp"], counts["fn"]
    return {
        "accuracy": (tp + tn, tp + tn + fp + fn),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
    }[name]


def _patient_bootstrap_cis(
    y: np.ndarray,
    s: np.ndarray,
    pred: np.ndarray,
    patient_index: np.ndarray,
    n_patients: int,
    points: Mapping[str, float | None],
    reasons: Mapping[str, str],
    n_boot: int,
    seed: int,
) -> tuple[dict, dict[str, str]]:
    """Percentile CIs from a cluster (patient) bootstrap, all resamples at once.

    A resample is a vector of patient multiplicities (multinomial with equal
    probabilities: the same law as drawing n_patients patients with replacement); an
    image weighs its patient's multiplicity. Confusion counts per resample are then a
    matrix product, and the AUC a weighted Mann-Whitney over the distinct scores.
    """
    cis: dict[str, list[float] | None] = {f"{name}_ci": None for name in SCALAR_METRICS}
    ci_reasons = {f"{name}_ci": reasons[name] for name in SCALAR_METRICS if name in reasons}
    if all(points[name] is None for name in SCALAR_METRICS):
        return cis, ci_reasons
    if n_boot < 1:
        off = NO_BOOTSTRAP
        ci_reasons.update({f"{name}_ci": off for name in SCALAR_METRICS if points[name] is not None})
        return cis, ci_reasons
    if n_patients < 2:
        single = "a single patient: a patient-level bootstrap has nothing to resample"
        ci_reasons.update({f"{name}_ci": single for name in SCALAR_METRICS if points[name] is not None})
        return cis, ci_reasons
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot).astype(float)
    replicates = _bootstrap_replicates(y, s, pred, patient_index, n_patients, weights)
    for name in SCALAR_METRICS:
        if points[name] is None:
            continue
        values = replicates[name]
        usable = values[np.isfinite(values)]
        if usable.size < MIN_USABLE_FRACTION * n_boot:
            ci_reasons[f"{name}_ci"] = (
                f"only {usable.size} of {n_boot} patient-level bootstrap resamples contained "
                f"{_RESAMPLE_NEEDS[name]} (fewer than {MIN_USABLE_FRACTION:.0%})"
            )
            continue
        cis[f"{name}_ci"] = _percentile_ci(usable)
    return cis, ci_reasons


def _bootstrap_replicates(
    y: np.ndarray,
    s: np.ndarray,
    pred: np.ndarray,
    patient_index: np.ndarray,
    n_patients: int,
    weights: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each metric for every resample (rows of ``weights``); NaN where undefined."""
    per_patient = {
        key: np.bincount(patient_index, weights=mask.astype(float), minlength=n_patients)
        for key, mask in _confusion_masks(y, pred).items()
    }
    c = {key: weights @ vec for key, vec in per_patient.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": (c["tp"] + c["tn"]) / (c["tp"] + c["tn"] + c["fp"] + c["fn"]),
            "sensitivity": c["tp"] / (c["tp"] + c["fn"]),
            "specificity": c["tn"] / (c["tn"] + c["fp"]),
        }
    distinct, score_index = np.unique(s, return_inverse=True)
    shape = (n_patients, distinct.size)
    by_class = [
        sparse.csr_matrix((np.ones(int(m.sum())), (patient_index[m], score_index[m])), shape=shape)
        for m in (y == 0, y == 1)
    ]
    neg, pos = ((matrix.T @ weights.T).T for matrix in by_class)
    out["auc"] = histogram_aucs(neg, pos)
    return out


def _confusion_masks(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    return {"tp": pred & (y == 1), "tn": ~pred & (y == 0), "fp": pred & (y == 0), "fn": ~pred & (y == 1)}


def _percentile_ci(values: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


# ---- shared -------------------------------------------------------------------------


def histogram_aucs(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUC = P(score_pos > score_neg) + P(tie)/2, from class weights in ordered groups.

    The array form of :func:`auc_from_histograms`, for bootstrap replicates and sites at
    once. The last axis lists groups (bins or distinct scores) in increasing score;
    leading axes are independent (replicates, sites). NaN where a class has no weight.
    """
    below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (below + 0.5 * neg), axis=-1)
    pairs = pos.sum(axis=-1) * neg.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _none_if_nan(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _order(out: dict) -> dict:
    """The keys in one documented order (metrics, CIs, counts, histograms, reasons)."""
    keys = (
        "n", "n_patients", "positives", *SCALAR_METRICS, "auc_binning_error", "ece",
        *(f"{m}_ci" for m in SCALAR_METRICS), *CONFUSION_COUNTS, *HISTOGRAMS, SCORE_SUMS,
        "per_patient", "reasons",
    )  # fmt: skip
    return {key: out[key] for key in keys if key in out}


# ---- histograms of several sites: the pool and its bootstrap ------------------------------


def stack_histograms(per_site: Mapping[str, dict]) -> tuple[np.ndarray, np.ndarray]:
    """Every site's negative and positive score histograms as two (sites, bins) float arrays.

    The one place sites' histograms are combined: the pooled metrics, the pooled-vs-within
    gap and leave-one-site-out all start here, so they agree on what "pooled" means.
    Raises ValueError when sites used different numbers of bins (``eval.hist-bins``).
    """
    lengths = {len(site[key]) for site in per_site.values() for key in HISTOGRAMS}
    if len(lengths) > 1:
        raise ValueError(f"sites sent histograms with different numbers of bins: {sorted(lengths)}; "
                         "every site must run with the same eval.hist-bins")
    bins = lengths.pop() if lengths else 0
    neg, pos = (np.array([site[key] for site in per_site.values()], dtype=float).reshape(len(per_site), bins)
                for key in HISTOGRAMS)
    return neg, pos


def pooled_auc(per_site: Mapping[str, dict]) -> float | None:
    """Binned AUC of all sites' histograms summed (the pooled test set); None when the pool
    lacks a class or there are no sites. The bias gap compares it with binned within-site
    AUCs, so that binning does not bias the gap; the pooled metric reported is
    :func:`pooled_auc_exact`."""
    neg, pos = stack_histograms(per_site)
    return auc_from_histograms(neg.sum(axis=0), pos.sum(axis=0))


def resample_histograms(
    neg: np.ndarray, pos: np.ndarray, n_boot: int, rng: np.random.Generator, *, resample_sites: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates of every site's class histograms, all drawn at once.

    ``neg`` and ``pos`` are (sites, bins) counts (:func:`stack_histograms`). In each
    replicate every site's negatives and positives are redrawn multinomially on that
    site's own bin proportions, its class counts fixed. With ``resample_sites`` each
    replicate first draws as many sites as there are, with replacement (the variability
    between hospitals as well as within them); slot j of replicate b then holds a redraw of
    the site drawn for it, independent of any other slot holding the same site. Without it
    the draws come site by site, in the order of a per-site loop, so a seed gives the
    same replicates as one.

    Returns (n_boot, sites, bins) float arrays of the negatives and the positives.
    """
    sites = neg.shape[0]
    if resample_sites:
        slots = rng.integers(0, sites, (n_boot, sites)).T  # (sites, n_boot): site drawn per slot
    else:
        slots = np.broadcast_to(np.arange(sites)[:, None], (sites, n_boot))
    out = []
    for counts in (neg, pos):
        totals = counts.sum(axis=1)
        share = counts / np.maximum(totals, 1.0)[:, None]
        draws = rng.multinomial(totals.astype(np.int64)[slots], share[slots], size=slots.shape)
        out.append(np.moveaxis(draws, 0, 1).astype(float))
    return out[0], out[1]


# ---- pooled_metrics helpers -----------------------------------------------------------


def wilson(successes: int, trials: int) -> tuple[float | None, list[float] | None]:
    """Proportion and its Wilson 95% interval (good coverage near 0 and 1, unlike Wald)."""
    if trials == 0:
        return None, None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return successes / trials, [float(ci.low), float(ci.high)]


def _pooled_class_reason(per_site: Mapping[str, dict], negatives: int, positives: int) -> str:
    if not per_site:
        return "no sites reported test metrics"
    if negatives + positives == 0:
        return "no test images at any site"
    return f"only one class in the pooled test set ({negatives} negatives, {positives} positives)"


def _pooled_empty_reason(name: str, per_site: Mapping[str, dict]) -> str:
    if not per_site:
        return "no sites reported test metrics"
    if name == "accuracy":
        return "no test images at any site"
    return f"no {'positive' if name == 'sensitivity' else 'negative'} test images at any site"


# ---- paired comparison of two models on the same patients --------------------------------


def paired_auc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
                          n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same rows (one per patient), with a paired bootstrap 95% CI.

    Both models are scored on each resample of the same patients, so the interval is that
    of the difference, narrower than two separate intervals when the models agree on who
    is hard. `scores_b` may be (R, n), R scorings of the same rows (R permutations of an
    input, fedir.client.input_sensitivity): then AUC(b) is the mean of their R AUCs, on
    every resample too. Returns ``{"auc_a", "auc_b", "difference", "difference_ci",
    "difference_se", "n", "reason"}`` (``difference_se``: the resamples' standard deviation);
    the CI is None (with a reason) when fewer than half of the resamples hold both classes.
    """
    y = np.asarray(labels).astype(int).reshape(-1)
    a = np.asarray(scores_a, dtype=float).reshape(-1)
    b = np.atleast_2d(np.asarray(scores_b, dtype=float))
    if not (y.size == a.size == b.shape[1]):
        raise ValueError(f"labels and the two score vectors differ in length: {y.size}, {a.size}, {b.shape[1]}")
    out: dict = {"auc_a": None, "auc_b": None, "difference": None, "difference_ci": None, "difference_se": None,
                 "n": int(y.size), "reason": None}
    if y.size == 0 or y.min() == y.max():
        out["reason"] = "one class only: no AUC"
        return out
    out["auc_a"] = _exact_auc(y, a)
    out["auc_b"] = float(np.mean([_exact_auc(y, row) for row in b]))
    out["difference"] = out["auc_a"] - out["auc_b"]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(y.size, np.full(y.size, 1.0 / y.size), size=n_boot).astype(float)
    diffs = _weighted_aucs(y, a, weights) - np.mean([_weighted_aucs(y, row, weights) for row in b], axis=0)
    usable = diffs[np.isfinite(diffs)]
    if usable.size < MIN_USABLE_FRACTION * n_boot:
        out["reason"] = f"only {usable.size} of {n_boot} resamples held both classes"
    else:
        out["difference_ci"] = _percentile_ci(usable)
        out["difference_se"] = float(np.std(usable, ddof=1))
    return out


def _weighted_aucs(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The AUC of every row of `weights` (a weight per score, e.g. bootstrap multiplicities)."""
    distinct, index = np.unique(s, return_inverse=True)
    by_class = [sparse.csr_matrix((np.ones(int(m.sum())), (np.flatnonzero(m), index[m])), shape=(y.size, distinct.size))
                for m in (y == 0, y == 1)]
    neg, pos = ((matrix.T @ weights.T).T for matrix in by_class)
    return histogram_aucs(neg, pos)
