"""The decision threshold, chosen on the validation patients, and the test metrics at it.

A threshold read off the test set would make the test sensitivity and specificity
optimistic: it is fitted to the very patients that then grade it. So the server picks it
on the VALIDATION split, which every site scores beside its test split in the same
evaluation reply (fedir.protocol), and applies it to the TEST split's histograms.

Under ``eval.threshold-rule = "youden"`` the threshold is the histogram bin edge that
maximises Youden's J (sensitivity + specificity - 1) on the pooled validation histograms;
per patient when every site sent per-patient metrics (the primary level where labels are
per patient), else per image. Only bin edges are candidates: at an edge, "score >= edge"
is exactly "in that bin or above" (fedir.metrics.bin_edges), so the test confusion counts
at it follow exactly from the test histograms, with nothing per patient leaving a site.
Ties in J go to the edge nearest 0.5, then to the lower edge: the least surprising
operating point among equals. With ``eval.threshold-per-site`` each site's test metrics
use its own validation histograms' edge instead (the pooled entry keeps the federation's),
when that site's validation set has both classes.

At the chosen edge, accuracy, sensitivity and specificity come with Wilson 95% intervals
from the counts: a count is a patient in a per-patient set, so those intervals have the
right unit; per image they treat images as independent (narrower than patient-level).

Under ``"fixed"`` (or when no validation set has both classes) the threshold is
``eval.threshold`` and the sites' own counts at it are kept unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedir.metrics import THRESHOLD_METRICS, bin_edges, rate_counts, stack_histograms, wilson

# Two J values closer than this are a tie (J is a difference of count ratios).
_TIE = 1e-12


@dataclass(frozen=True)
class Threshold:
    """One decision threshold and where it came from (stored with the metrics it made)."""

    value: float
    rule: str  # "youden" or "fixed"
    chosen_on: str  # "validation" or "fixed"
    edge: int | None = None  # the histogram edge index under youden
    youden_j: float | None = None  # J on the validation patients it was chosen on
    level: str | None = None  # "per_patient" or "per_image": the validation histograms used
    reason: str | None = None  # why a youden threshold fell back (to fixed, or to the federation's)

    def record(self) -> dict[str, Any]:
        """The JSON form stored in runs.sqlite (a vector) and shown in summary.json."""
        return {"value": self.value, "rule": self.rule, "chosen_on": self.chosen_on, "youden_j": self.youden_j,
                "level": self.level, "reason": self.reason}


@dataclass(frozen=True)
class Thresholded:
    """The round's test metrics at the chosen thresholds."""

    federation: Threshold
    per_site: dict[str, dict] = field(default_factory=dict)  # each site's entry at its threshold
    for_pool: dict[str, dict] = field(default_factory=dict)  # each site's entry at the federation's


def youden(hist_neg: Any, hist_pos: Any) -> tuple[int, float] | None:
    """(edge index, J) of the interior bin edge maximising Youden's J; None without both classes.

    At edge k a score in bin k or above is positive: sensitivity = positives in bins >= k
    over all positives, specificity = negatives in bins < k over all negatives. Ties go to
    the edge nearest 0.5, then to the lower one.
    """
    neg = np.asarray(hist_neg, dtype=float)
    pos = np.asarray(hist_pos, dtype=float)
    if neg.sum() == 0 or pos.sum() == 0 or neg.size < 2:
        return None
    k = np.arange(1, neg.size)  # edges 0 and `bins` call everyone alike: J = 0
    sensitivity = 1.0 - np.cumsum(pos)[k - 1] / pos.sum()
    specificity = np.cumsum(neg)[k - 1] / neg.sum()
    j = sensitivity + specificity - 1.0
    best = np.flatnonzero(j >= j.max() - _TIE)
    edges = bin_edges(neg.size)[k[best]]
    pick = best[np.lexsort((edges, np.abs(edges - 0.5)))[0]]
    return int(k[pick]), float(j[pick])


def choose(val: Mapping[str, dict], *, rule: str, fixed: float) -> Threshold:
    """The federation's threshold from the sites' validation metrics (never the test ones)."""
    if rule == "fixed":
        return Threshold(fixed, "fixed", "fixed")
    level, sets = _level(val)
    if not sets:
        return Threshold(fixed, "fixed", "fixed", reason="no site sent validation metrics: eval.threshold used")
    neg, pos = stack_histograms(sets)
    best = youden(neg.sum(axis=0), pos.sum(axis=0))
    if best is None:
        return Threshold(fixed, "fixed", "fixed", level=level,
                         reason="the pooled validation patients lack a class: eval.threshold used")
    edge, j = best
    return Threshold(float(bin_edges(neg.shape[1])[edge]), "youden", "validation", edge, j, level)


def choose_per_site(val: Mapping[str, dict], federation: Threshold, sites: list[str]) -> dict[str, Threshold]:
    """Each site's own validation threshold; the federation's, with a reason, where it has none."""
    level = federation.level or "per_patient"
    out: dict[str, Threshold] = {}
    for site in sites:
        entry = val.get(site)
        own: dict | None = entry.get(level) if entry is not None and level == "per_patient" else entry
        best = None if own is None else youden(own["hist_neg"], own["hist_pos"])
        if own is None or best is None:
            why = "no validation metrics" if own is None else "its validation patients lack a class"
            out[site] = Threshold(federation.value, federation.rule, federation.chosen_on, federation.edge,
                                  federation.youden_j, federation.level, f"{why}: the federation's threshold used")
        else:
            edge, j = best
            out[site] = Threshold(float(bin_edges(len(own["hist_neg"]))[edge]), "youden", "validation", edge, j, level)
    return out


def thresholded(test: Mapping[str, dict], val: Mapping[str, dict], *, rule: str, fixed: float,
                per_site: bool) -> Thresholded:
    """Choose the thresholds on ``val`` and return ``test``'s entries at them (copies)."""
    federation = choose(val, rule=rule, fixed=fixed)
    pool = {site: at(entry, federation) for site, entry in test.items()}
    if not per_site or federation.rule != "youden":
        return Thresholded(federation, pool, pool)
    own = choose_per_site(val, federation, list(test))
    return Thresholded(federation, {site: at(entry, own[site]) for site, entry in test.items()}, pool)


def at(entry: dict, threshold: Threshold) -> dict:
    """A site's (or pooled) test entry, and its per-patient one, at ``threshold``: the
    confusion counts from the test histograms at its edge, the rates with Wilson CIs."""
    out = _at(entry, threshold)
    if entry.get("per_patient") is not None:
        out["per_patient"] = _at(entry["per_patient"], threshold)
    return out


def _at(entry: dict, threshold: Threshold) -> dict:
    out = {**entry, "reasons": dict(entry.get("reasons") or {}), "threshold": threshold.record()}
    if threshold.edge is None:  # fixed: the site's own counts at eval.threshold stand
        return out
    neg = np.asarray(entry["hist_neg"], dtype=float)
    pos = np.asarray(entry["hist_pos"], dtype=float)
    if threshold.edge >= neg.size:
        raise ValueError(f"threshold edge {threshold.edge} is beyond the test histograms' {neg.size} bins")
    k = threshold.edge
    counts = {"tp": int(pos[k:].sum()), "fn": int(pos[:k].sum()), "tn": int(neg[:k].sum()), "fp": int(neg[k:].sum())}
    out.update(counts)
    for name in THRESHOLD_METRICS:
        out["reasons"].pop(name, None)
        out["reasons"].pop(f"{name}_ci", None)
        successes, trials = rate_counts(name, counts)
        out[name], out[f"{name}_ci"] = wilson(successes, trials)
        if trials == 0:
            missing = {"accuracy": "test", "sensitivity": "positive test", "specificity": "negative test"}[name]
            out["reasons"][name] = out["reasons"][f"{name}_ci"] = f"no {missing} cases"
    return out


def _level(val: Mapping[str, dict]) -> tuple[str, dict[str, dict]]:
    """The validation sets to choose on: per patient when every site sent them, else per image."""
    if val and all(entry.get("per_patient") is not None for entry in val.values()):
        return "per_patient", {site: entry["per_patient"] for site, entry in val.items()}
    return "per_image", dict(val)
