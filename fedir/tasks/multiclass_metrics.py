"""Multi-class evaluation aggregates (task.classes = K > 2): computed at a site, pooled at the server.

A site scores each image with the K class probabilities (softmax) and predicts the argmax
(`task.decision = "argmax"`, the rule of the highest accuracy) or, with `task.decision =
"balanced"`, the argmax of p_c / pi_c, where pi is the class prevalence among the site's
own labelled training patients (:func:`class_priors`): for calibrated probabilities that is
the rule of the highest expected balanced accuracy (every class's recall counts alike), so a
rare grade is not swallowed by the common one. There is no decision threshold for K > 2
(Youden's J is a binary rule). The AUCs and histograms do not depend on the rule. What leaves the
site is :func:`site_multiclass_metrics`, per image and, where labels are per patient, per
patient (the patient's mean probability vector, the patient's label):

- the macro one-vs-rest AUC (the mean over classes of the AUC of p_c for class c against
  the rest: sklearn's ``roc_auc_score(multi_class="ovr", average="macro")``, the reference
  in the tests), balanced accuracy (the mean per-class recall over the classes present, as
  sklearn's ``balanced_accuracy_score``) and accuracy, each with a patient-bootstrap 95% CI;
- the per-class one-vs-rest AUCs (exact, for the pooled AUC's within-site pairs) and the
  per-class sensitivity (recall);
- the K x K confusion counts (rows: true class, columns: predicted class), summable;
- per class c, two fixed-bin histograms of p_c: among class c and among the rest, so that
  the server rebuilds every one-vs-rest AUC of the pool (:func:`pooled_multiclass_metrics`).

Privacy: the K pairs of histograms place a lone patient's probability of each class within
1/bins: K times what a binary site's histograms reveal. No identifier ever leaves the site.
Every value returned is a plain Python number, list or None (JSON-safe, NaN-free).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse

from fedir.metrics import (
    MIN_USABLE_FRACTION,
    NO_BOOTSTRAP,
    bin_edges,
    histogram_aucs,
    pooled_auc_exact,
    resample_histograms,
    wilson,
)

CONFIDENCE = 0.95
# ---- the names of a multi-class evaluation (fedir.protocol encodes exactly these) ---------
MULTICLASS_COUNTS = ("n", "n_patients", "classes")
MULTICLASS_SCALARS = ("auc", "balanced_accuracy", "accuracy")  # each with `<name>_ci`
CONFUSION = "confusion"  # (K, K) counts, rows = true class, flattened row-major on the wire
CLASS_AUCS = "auc_per_class"  # (K,) exact one-vs-rest AUCs (None where a class or the rest is empty)
SENSITIVITY = "sensitivity_per_class"  # (K,) recalls (None where a class is absent)
HIST_REST, HIST_CLASS = "hist_rest", "hist_class"  # (K, bins): p_c among the rest / among class c


def validate(labels, probabilities, patients) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(labels (N,), probabilities (N, K), patient index (N,), number of patients), checked."""
    p = np.asarray(probabilities, dtype=float)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"multi-class scores are (N, K >= 3) probabilities, got shape {p.shape}")
    y = np.asarray(labels).reshape(-1)
    ids = np.asarray(patients).astype(str).reshape(-1)
    if not (y.size == p.shape[0] == ids.size):
        raise ValueError(f"labels, scores and patients differ in length: {y.size}, {p.shape[0]}, {ids.size}")
    k = p.shape[1]
    if y.size and not np.isin(y, np.arange(k)).all():
        raise ValueError(f"labels must be 0..{k - 1}, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(p).all() or (p.size and (p.min() < 0 or p.max() > 1)):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    uniq, index = np.unique(ids, return_inverse=True)
    return y.astype(int), p, index.reshape(-1), int(uniq.size)


def patient_probabilities(labels, probabilities, patients) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One row per patient: (ids, label, the mean of the patient's images' probability vectors).
    ValueError when a patient's images carry different labels (labels are then per image)."""
    y, p, index, n_patients = validate(labels, probabilities, patients)
    ids = np.unique(np.asarray(patients).astype(str).reshape(-1)).tolist()
    count = np.bincount(index, minlength=n_patients)
    first = np.full(n_patients, -1)
    first[index[::-1]] = y[::-1]
    pairs = np.unique(np.stack([index, y]), axis=1) if y.size else np.zeros((2, 0), dtype=int)
    mixed = int(np.sum(np.bincount(pairs[0], minlength=n_patients) > 1))
    if mixed:
        raise ValueError(f"{mixed} patient(s) have images of different labels: labels are per image, "
                         "so there is no per-patient metric")
    mean = np.stack([np.bincount(index, weights=p[:, c], minlength=n_patients) for c in range(p.shape[1])], axis=1)
    return ids, first, np.clip(mean / np.maximum(count, 1)[:, None], 0.0, 1.0)


def class_priors(label_counts: Mapping[int, int], classes: int) -> np.ndarray:
    """(K,) class prevalence of a site's labelled training patients, add-one smoothed so that a
    class the site has not seen keeps a finite weight in the balanced decision."""
    counts = np.array([label_counts.get(c, 0) for c in range(classes)], dtype=float)
    return (counts + 1.0) / (counts.sum() + classes)


def decide(probabilities: np.ndarray, priors: np.ndarray | None = None) -> np.ndarray:
    """(N,) predicted classes of (N, K) probabilities: the argmax, or with (K,) `priors` the
    argmax of p_c / pi_c (the balanced rule; module docstring)."""
    p = np.asarray(probabilities, dtype=float)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=int)
    return (p if priors is None else p / np.asarray(priors, dtype=float)).argmax(axis=1)


def site_multiclass_metrics(labels, probabilities, patients: Sequence[str], *, n_boot: int = 500, seed: int = 0,
                            bins: int = 50, priors: np.ndarray | None = None) -> dict:
    """Test-set aggregates of one site (see the module docstring); `per_patient` holds the
    same set with one row per patient, None (with a reason) when labels are per image.
    `priors`: the balanced decision's class prevalence (:func:`class_priors`); None: argmax."""
    out = _metric_set(labels, probabilities, patients, n_boot=n_boot, seed=seed, bins=bins, priors=priors)
    try:
        ids, patient_y, patient_p = patient_probabilities(labels, probabilities, patients)
    except ValueError as exc:
        out["reasons"]["per_patient"] = str(exc)
        return {**out, "per_patient": None}
    return {**out, "per_patient": _metric_set(patient_y, patient_p, ids, n_boot=n_boot, seed=seed, bins=bins,
                                              priors=priors)}


def _metric_set(labels, probabilities, patients, *, n_boot: int, seed: int, bins: int,
                priors: np.ndarray | None) -> dict:
    y, p, index, n_patients = validate(labels, probabilities, patients)
    k = p.shape[1]
    pred = decide(p, priors)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    edges = bin_edges(bins)
    rest = [np.histogram(p[y != c, c], bins=edges)[0] for c in range(k)]
    own = [np.histogram(p[y == c, c], bins=edges)[0] for c in range(k)]
    class_aucs = [_exact_ovr_auc(y == c, p[:, c]) for c in range(k)]
    out: dict = {"n": int(y.size), "n_patients": n_patients, "classes": k,
                 CONFUSION: confusion.tolist(), CLASS_AUCS: class_aucs,
                 HIST_REST: [[int(v) for v in h] for h in rest], HIST_CLASS: [[int(v) for v in h] for h in own]}
    points, reasons = point_estimates(confusion, class_aucs)
    out.update(points)
    cis, ci_reasons = _bootstrap_cis(y, p, pred, index, n_patients, points, n_boot, seed)
    out.update(cis)
    out["reasons"] = {**reasons, **{f"{m}_ci": reasons[m] for m in MULTICLASS_SCALARS if m in reasons}, **ci_reasons}
    return out


def point_estimates(confusion: np.ndarray, class_aucs: Sequence[float | None]) -> tuple[dict, dict[str, str]]:
    """Macro AUC, balanced accuracy, accuracy and per-class sensitivity from the confusion
    counts and the per-class AUCs; a reason for each scalar that is undefined."""
    confusion = np.asarray(confusion, dtype=float)
    support = confusion.sum(axis=1)
    n = float(confusion.sum())
    reasons: dict[str, str] = {}
    recall = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(confusion.shape[0])]
    present = [r for r in recall if r is not None]
    points: dict = {SENSITIVITY: recall, "accuracy": float(np.trace(confusion) / n) if n else None,
                    "balanced_accuracy": float(np.mean(present)) if present else None}
    absent = [str(c) for c, s in enumerate(support) if not s]
    if n == 0:
        reasons.update(dict.fromkeys(MULTICLASS_SCALARS, "no test images"))
        points["auc"] = None
    elif any(a is None for a in class_aucs):
        points["auc"] = None
        reasons["auc"] = (f"class(es) {', '.join(absent)} absent from the test set: the macro one-vs-rest AUC "
                          "needs every class")
    else:
        points["auc"] = float(np.mean([float(a) for a in class_aucs if a is not None]))
    return points, reasons


def _exact_ovr_auc(is_class: np.ndarray, s: np.ndarray) -> float | None:
    """Mann-Whitney AUC of scores `s` for `is_class` against the rest (ties count 1/2)."""
    if is_class.all() or not is_class.any():
        return None
    distinct, index = np.unique(s, return_inverse=True)
    neg, pos = (np.bincount(index[m], minlength=distinct.size).astype(float) for m in (~is_class, is_class))
    return float(histogram_aucs(neg, pos))


def _bootstrap_cis(y, p, pred, index, n_patients: int, points: Mapping, n_boot: int, seed: int
                   ) -> tuple[dict, dict[str, str]]:
    """Percentile 95% CIs of the scalars from a patient bootstrap (a resample = patient
    multiplicities, multinomial; an image weighs its patient's multiplicity), all at once."""
    cis: dict = {f"{m}_ci": None for m in MULTICLASS_SCALARS}
    reasons: dict[str, str] = {}
    defined = [m for m in MULTICLASS_SCALARS if points[m] is not None]
    if not defined:
        return cis, reasons
    if n_boot < 1 or n_patients < 2:
        why = NO_BOOTSTRAP if n_boot < 1 else "a single patient: a patient-level bootstrap has nothing to resample"
        return cis, {f"{m}_ci": why for m in defined}
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot).astype(float)
    k = p.shape[1]

    def per_patient(mask: np.ndarray) -> np.ndarray:
        return weights @ np.bincount(index, weights=mask.astype(float), minlength=n_patients)

    support = np.stack([per_patient(y == c) for c in range(k)], axis=1)  # (n_boot, K)
    hits = np.stack([per_patient((y == c) & (pred == c)) for c in range(k)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / np.where(support > 0, support, 1.0), np.nan)
        present = np.isfinite(recall).sum(axis=1)
        replicates = {
            "accuracy": hits.sum(axis=1) / support.sum(axis=1),
            "balanced_accuracy": np.where(present > 0, np.nansum(np.nan_to_num(recall), axis=1)
                                          / np.maximum(present, 1), np.nan),
        }
    aucs = []
    for c in range(k):
        distinct, score_index = np.unique(p[:, c], return_inverse=True)
        shape = (n_patients, distinct.size)
        neg, pos = ((sparse.csr_matrix((np.ones(int(m.sum())), (index[m], score_index[m])), shape=shape).T
                     @ weights.T).T for m in (y != c, y == c))
        aucs.append(histogram_aucs(neg, pos))
    replicates["auc"] = np.mean(aucs, axis=0)  # NaN wherever a class (or its rest) is missing
    needs = {"auc": "every class", "balanced_accuracy": "a labelled image", "accuracy": "an image"}
    for m in defined:
        usable = replicates[m][np.isfinite(replicates[m])]
        if usable.size < MIN_USABLE_FRACTION * n_boot:
            reasons[f"{m}_ci"] = (f"only {usable.size} of {n_boot} patient-level bootstrap resamples contained "
                                  f"{needs[m]} (fewer than {MIN_USABLE_FRACTION:.0%})")
        else:
            cis[f"{m}_ci"] = _percentile_ci(usable)
    return cis, reasons


def _percentile_ci(values: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


# ---- the pool, from the sites' aggregates only ----------------------------------------------


def pooled_multiclass_metrics(per_site: Mapping[str, Mapping], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Federation-level metrics from what the sites sent, per image and per patient.

    - The confusion counts are summed: balanced accuracy, accuracy and per-class
      sensitivity are exact (the pool's argmax predictions are the sites').
    - Each class's one-vs-rest AUC is fedir.metrics.pooled_auc_exact of that class's
      summed histograms (p_c among class c against the rest) with the sites' exact
      per-class AUCs: exact for within-site pairs, binned for cross-site pairs, off by at
      most ``auc_binning_error`` (the largest of the K classes' bounds: the macro AUC, a
      mean of K AUCs, is off by no more than the largest).
    - CIs: the macro AUC's is a percentile bootstrap resampling every site's per-class
      histograms (multinomial, each site's class counts fixed; fedir.metrics.
      resample_histograms), each class resampled independently (the K histograms of one
      site share its patients; this treats them as independent), shifted by the exact
      point's offset from the binned one. The balanced accuracy's resamples every site's
      confusion rows (multinomial on the row's proportions, the row's count fixed): the
      sampling noise of each site's test set, the federation's composition as observed.
      Accuracy has a Wilson interval. At the image level these treat images as
      independent (narrower than patient-level); ``per_patient`` counts patients.
    """
    out = _pooled_set(per_site, n_boot=n_boot, seed=seed)
    missing = sorted(site for site, entry in per_site.items() if not entry.get("per_patient"))
    if not per_site or missing:
        out["reasons"]["per_patient"] = ("no sites reported test metrics" if not per_site else
                                         f"no per-patient metrics from {', '.join(missing)}")
        return {**out, "per_patient": None}
    by_patient = {site: entry["per_patient"] for site, entry in per_site.items()}
    return {**out, "per_patient": _pooled_set(by_patient, n_boot=n_boot, seed=seed)}


def _pooled_set(per_site: Mapping[str, Mapping], *, n_boot: int, seed: int) -> dict:
    ks = {int(entry["classes"]) for entry in per_site.values()}
    if len(ks) > 1:
        raise ValueError(f"sites sent different numbers of classes: {sorted(ks)}; every site runs one task.classes")
    k = ks.pop() if ks else 0
    confusion = np.sum([np.asarray(e[CONFUSION], dtype=np.int64) for e in per_site.values()], axis=0) \
        if per_site else np.zeros((0, 0), dtype=np.int64)
    rest = np.array([e[HIST_REST] for e in per_site.values()], dtype=float)  # (sites, K, bins)
    own = np.array([e[HIST_CLASS] for e in per_site.values()], dtype=float)
    class_aucs: list[float | None] = []
    bounds: list[float] = []
    for c in range(k):
        auc, bound = pooled_auc_exact({site: {"auc": e[CLASS_AUCS][c], "hist_neg": e[HIST_REST][c],
                                              "hist_pos": e[HIST_CLASS][c]} for site, e in per_site.items()})
        class_aucs.append(auc)
        bounds.append(0.0 if bound is None else bound)
    points, reasons = point_estimates(confusion, class_aucs) if per_site else (
        dict.fromkeys((*MULTICLASS_SCALARS, SENSITIVITY)), dict.fromkeys(MULTICLASS_SCALARS, "no sites reported"))
    out: dict = {"n": sum(int(e["n"]) for e in per_site.values()),
                 "n_patients": sum(int(e["n_patients"]) for e in per_site.values()), "classes": k,
                 CONFUSION: confusion.tolist(), CLASS_AUCS: class_aucs,
                 HIST_REST: rest.sum(axis=0).astype(int).tolist() if per_site else [],
                 HIST_CLASS: own.sum(axis=0).astype(int).tolist() if per_site else [],
                 **points, "auc_binning_error": max(bounds) if points["auc"] is not None else None}
    cis: dict[str, list[float] | None] = {f"{m}_ci": None for m in MULTICLASS_SCALARS}
    rng = np.random.default_rng(seed)
    if points["accuracy"] is not None:
        cis["accuracy_ci"] = wilson(int(np.trace(confusion)), int(confusion.sum()))[1]
    if n_boot < 1:
        reasons.update({f"{m}_ci": NO_BOOTSTRAP for m in ("auc", "balanced_accuracy") if points[m] is not None})
    else:
        if points["auc"] is not None:
            replicates = np.zeros(n_boot)
            for c in range(k):
                neg, pos = resample_histograms(rest[:, c], own[:, c], n_boot, rng)
                binned = float(histogram_aucs(rest[:, c].sum(axis=0), own[:, c].sum(axis=0)))
                replicates += histogram_aucs(neg.sum(axis=1), pos.sum(axis=1)) + (float(class_aucs[c] or 0.0) - binned)
            cis["auc_ci"] = _percentile_ci(np.clip(replicates / k, 0.0, 1.0))
        if points["balanced_accuracy"] is not None:
            cis["balanced_accuracy_ci"] = _percentile_ci(_resampled_balanced_accuracy(per_site, n_boot, rng))
    for m in MULTICLASS_SCALARS:
        if m in reasons and f"{m}_ci" not in reasons:
            reasons[f"{m}_ci"] = reasons[m]
    return {**out, **cis, "reasons": reasons}


def _resampled_balanced_accuracy(per_site: Mapping[str, Mapping], n_boot: int, rng: np.random.Generator
                                 ) -> np.ndarray:
    """The pooled balanced accuracy of (n_boot,) resamples: every site's confusion rows redrawn."""
    stacked = np.array([e[CONFUSION] for e in per_site.values()], dtype=float)  # (sites, K, K)
    totals = stacked.sum(axis=2)
    share = stacked / np.maximum(totals, 1.0)[..., None]
    draws = rng.multinomial(totals.astype(np.int64), share, size=(n_boot, *totals.shape))  # (B, sites, K, K)
    pooled = draws.sum(axis=1)
    support = pooled.sum(axis=2)
    diagonal = np.diagonal(pooled, axis1=1, axis2=2)
    present = support > 0  # fixed across resamples: each row's count is held
    return (diagonal[:, present[0]] / support[:, present[0]]).mean(axis=1)
