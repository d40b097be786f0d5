"""First Frankenstein-dataset checks, from the aggregates the sites send.

A Frankenstein federation is one where the label is confounded with the site
(positives mostly from one hospital), so a model can score well by recognising the
hospital. Two checks here, each a plain JSON-serialisable dict with ``name``,
``computable``, ``alarm``, ``sites`` (the sites to look at) and ``reason`` (a sentence
for the report):

- :func:`site_label_association`: is the label distribution different between sites?
  (the precondition for confounding, from training label counts);
- :func:`pooled_vs_within_auc`: does the model rank better across sites than within
  them? (the symptom: it separates hospitals, not disease).

:func:`verdict` combines them for the run summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import chi2_contingency
from scipy.stats.contingency import association

from fedir.metrics import auc_from_histograms, histogram_aucs, pooled_auc, resample_histograms, stack_histograms

# |adjusted residual| above this names a site: ~N(0,1) under independence, so 3 keeps
# the false-naming rate small even with tens of sites (two-sided p ~ 0.003 per site).
RESIDUAL_LIMIT = 3.0
# A site is named by pooled_vs_within_auc when its mean score deviates from the pooled
# mean by at least this fraction of the largest deviation: the most separated site and
# any nearly as separated.
NEAR_EXTREME = 2 / 3


# ---- site x label association ---------------------------------------------------------


def site_label_association(
    label_counts: Mapping[str, Mapping[int, int]],
    *,
    alpha: float = 0.01,
    min_cramers_v: float = 0.2,
    subject: str = "label",
    categories: Mapping[int, str] | None = None,
) -> dict:
    """Chi-square test of independence of site and label on the training label counts.

    The alarm needs both significance (p < ``alpha``) and an effect size (Cramer's V >=
    ``min_cramers_v``): with thousands of images a trivial prevalence difference is
    significant, and with a handful a large one is not; only a large, real difference
    lets a model learn "site" as a proxy for "label". Sites without labelled patients and
    classes without images are dropped first (they carry no information and make the
    expected counts zero). The sites named are those whose positive-class count has an
    adjusted standardized residual beyond +-3 (the cells that drive the statistic),
    most extreme first. With K > 2 classes (task.classes) the table is K x sites and the
    class shown (`class`, its prevalence and residuals) is the one with the most extreme
    cell; `residuals_per_class` holds every cell's. Class keys may be ints or their
    strings (as after JSON).

    `subject` and `categories` name what the table counts in the reason (the same test
    on a segmentation site's patients per foreground-fraction bin:
    fedir.strategies.segmentation_bias): "label" and "class c" by default.
    """
    table, sites, classes = _table(label_counts)
    thresholds = {"alpha": alpha, "min_cramers_v": min_cramers_v}
    out: dict[str, Any] = {
        "name": "site_label_association",
        "computable": False,
        "statistic": None,
        "dof": None,
        "p_value": None,
        "cramers_v": None,
        "thresholds": thresholds,
        "alarm": False,
        "sites": [],
        "table": {site: {cls: int(c) for cls, c in zip(classes, row)} for site, row in zip(sites, table)},
        "prevalence": {},
        "residuals": {},
        "reason": "",
    }
    if len(sites) < 2 or len(classes) < 2:
        out["reason"] = (
            f"not computable: needs at least 2 sites and 2 classes with labelled patients, "
            f"got {len(sites)} site(s) and {len(classes)} class(es)"
        )
        return out
    positive = 1 if 1 in classes else max(classes)
    column = classes.index(positive)
    result = chi2_contingency(table)
    cells = _adjusted_residuals(table)
    if len(classes) > 2:
        # K > 2 classes (a K x sites table): the prevalence and residuals shown are those of
        # the class with the most extreme cell, the one that drives the statistic most
        column = int(np.argmax(np.abs(cells).max(axis=0)))
        out["class"] = classes[column]
        out["residuals_per_class"] = {site: {str(c): float(r) for c, r in zip(classes, row)}
                                      for site, row in zip(sites, cells)}
    residuals = cells[:, column]
    out.update(
        computable=True,
        statistic=float(result.statistic),
        dof=int(result.dof),
        p_value=float(result.pvalue),
        cramers_v=float(association(table, method="cramer")),
        prevalence={site: float(row[column] / row.sum()) for site, row in zip(sites, table)},
        residuals={site: float(r) for site, r in zip(sites, residuals)},
    )
    out["alarm"] = bool(out["p_value"] < alpha and out["cramers_v"] >= min_cramers_v)
    if out["alarm"]:
        out["sites"] = _sites_by_residual(sites, residuals)
        named = f"class {out['class']} " if "class" in out else ""  # K > 2: the class shown
        if categories is not None:
            named = f"{categories[classes[column]]} "
        out["reason"] = _association_reason(out, table, sites, column, subject, named)
    return out


def _table(label_counts: Mapping[str, Mapping[int, int]]) -> tuple[np.ndarray, list[str], list[int]]:
    """The site x class count table without all-zero rows and columns."""
    sites = list(label_counts)
    classes = sorted({int(c) for counts in label_counts.values() for c in counts})
    table = np.array(
        [[int(_count(label_counts[site], c)) for c in classes] for site in sites], dtype=np.int64
    ).reshape(len(sites), len(classes))
    rows = table.sum(axis=1) > 0
    cols = table.sum(axis=0) > 0
    return (
        table[rows][:, cols],
        [s for s, keep in zip(sites, rows) if keep],
        [c for c, keep in zip(classes, cols) if keep],
    )


def _count(counts: Mapping, cls: int) -> int:
    """A class count whether the key is the int or its string (JSON turns keys to str)."""
    return counts.get(cls, counts.get(str(cls), 0))


def _adjusted_residuals(table: np.ndarray) -> np.ndarray:
    """Haberman's adjusted standardized residuals, ~N(0, 1) per cell under independence."""
    n = table.sum()
    row = table.sum(axis=1, keepdims=True) / n
    col = table.sum(axis=0, keepdims=True) / n
    expected = n * row * col
    return (table - expected) / np.sqrt(expected * (1 - row) * (1 - col))


def _sites_by_residual(sites: list[str], residuals: np.ndarray) -> list[str]:
    """Sites beyond the residual limit, most extreme first; else the single most extreme."""
    order = np.argsort(-np.abs(residuals), kind="stable")
    named = [sites[i] for i in order if abs(residuals[i]) > RESIDUAL_LIMIT]
    return named or [sites[order[0]]]


def _association_reason(out: dict, table: np.ndarray, sites: list[str], column: int, subject: str,
                        which: str) -> str:
    parts = []
    for site in out["sites"]:
        i = sites.index(site)
        rest = np.delete(table, i, axis=0)
        rest_prev = rest[:, column].sum() / rest.sum()
        parts.append(
            f"{site} has {which}prevalence {out['prevalence'][site]:.0%} ({table[i, column]}/{table[i].sum()}) "
            f"vs {rest_prev:.0%} in the other sites ({rest[:, column].sum()}/{rest.sum()})"
        )
    return (
        f"{subject} is associated with site (chi-square {out['statistic']:.1f}, dof {out['dof']}, "
        f"p={out['p_value']:.2g} < {out['thresholds']['alpha']}, Cramer's V {out['cramers_v']:.2f} "
        f">= {out['thresholds']['min_cramers_v']}): " + "; ".join(parts)
    )


# ---- pooled vs within-site AUC ----------------------------------------------------------


def evaluation_level(per_site: Mapping[str, dict]) -> tuple[dict[str, dict], str, str]:
    """The per-site metrics the between-site tests compare, their level and why not per patient.

    Per patient (each site's ``per_patient``: one row per patient, the mean of their image
    scores) when every site sent them: the patient is the unit labels and sampling come in,
    and a patient's images share anatomy, scanner and disease, so counting images as
    independent makes an interval too narrow and weighs a patient by their number of images.
    Otherwise per image for every site, never a mix (a pooled histogram must count one kind of
    unit), with the sites that lack them and their reasons. Returns (metrics by site,
    "patient" or "image", the reason for "image", else "").
    """
    missing = {site: (m.get("reasons") or {}).get("per_patient", "none sent")
               for site, m in per_site.items() if not m.get("per_patient")}
    if not missing:
        return {site: m["per_patient"] for site, m in per_site.items()}, "patient", ""
    return dict(per_site), "image", "per image: no per-patient metrics from " + "; ".join(
        f"{site} ({why})" for site, why in missing.items())


def pooled_vs_within_auc(
    per_site: Mapping[str, dict], *, max_gap: float = 0.05, n_boot: int = 200, seed: int = 0
) -> dict:
    """Compare the AUC of all sites' scores pooled with the mean within-site AUC.

    Within a site the hospital is constant, so a within-site AUC measures disease
    ranking only; pooled, the model is also credited for ranking one hospital's patients
    above another's. When positives are concentrated at a site the model can tell apart,
    pooled AUC exceeds within-site AUC. Alarm: gap = pooled - within > ``max_gap`` and the
    95% interval of the gap (``gap_ci``) above 0.

    Computed per patient where every site sent per-patient histograms (``level``, with
    ``level_reason`` when it falls back to images: :func:`evaluation_level`). ``gap_ci``
    redraws every site's patients (its class counts fixed) and keeps the sites as they are:
    the verdict is about these hospitals, and the patients of each are the sample. An
    interval that also resamples sites (``gap_ci_sites``, reported beside it) answers
    another question, whether hospitals drawn like these would show the gap; it cannot
    decide, since a replicate omits any one site with probability (1 - 1/K)^K >= 0.25
    (about 1/e), so a gap carried by one confounded site, the typical Frankenstein case,
    would almost never have its interval above 0.

    Pooled AUC is the binned Mann-Whitney AUC of the summed histograms of *all* sites,
    including sites with one class only (exactly the sites a confounded federation
    has); within AUC is the n-weighted mean of the sites' defined AUCs, from their
    histograms too (so that binning does not bias the gap), and the sites
    without one are listed in ``excluded`` with their reason. When alarmed, the sites
    named are those whose mean score (histogram bin centres) is furthest from the pooled
    mean: the sites the model separates from the rest.
    """
    units, level, level_reason = evaluation_level(per_site)
    site_auc = {site: _float_or_none(m.get("auc")) for site, m in units.items()}
    # Both sides of the gap from the same histograms: binning ties scores within a bin,
    # which lowers a binned AUC, so an exact within-site AUC against a binned pooled one
    # would bias the gap downwards (by 0.03 for a good model with 20 bins, measured).
    binned = {site: auc_from_histograms(m["hist_neg"], m["hist_pos"]) if auc is not None else None
              for (site, m), auc in zip(units.items(), site_auc.values())}
    excluded = {
        site: m.get("reasons", {}).get("auc", "AUC undefined") for site, m in units.items() if site_auc[site] is None
    }
    means = {site: _mean_score(m["hist_neg"], m["hist_pos"]) for site, m in units.items()}
    out: dict[str, Any] = {
        "name": "pooled_vs_within_auc",
        "computable": False,
        "level": level,
        "level_reason": level_reason,
        "pooled_auc": pooled_auc(units),
        "within_auc": _within_auc(units, binned),
        "gap": None,
        "gap_ci": None,
        "gap_ci_sites": None,
        "site_auc": site_auc,
        "site_mean_score": means,
        "excluded": excluded,
        "thresholds": {"max_gap": max_gap},
        "alarm": False,
        "sites": [],
        "reason": "",
    }
    if out["pooled_auc"] is None or out["within_auc"] is None:
        out["reason"] = _not_computable_reason(out)
        return out
    out["computable"] = True
    out["gap"] = out["pooled_auc"] - out["within_auc"]
    out["gap_ci"] = _gap_ci(units, n_boot, seed, resample_sites=False)
    out["gap_ci_sites"] = _gap_ci(units, n_boot, seed, resample_sites=True)
    out["alarm"] = bool(out["gap"] > max_gap and (out["gap_ci"] is None or out["gap_ci"][0] > 0))
    if out["alarm"]:
        neg, pos = stack_histograms(units)
        pooled_mean = _mean_score(neg.sum(axis=0), pos.sum(axis=0))
        assert pooled_mean is not None  # a computable pooled AUC has scored patients (or images)
        out["sites"] = _most_separated(means, pooled_mean)
        out["reason"] = _gap_reason(out, pooled_mean)
    return out


def _gap_ci(per_site: Mapping[str, dict], n_boot: int, seed: int, resample_sites: bool) -> list[float] | None:
    """Percentile 95% interval of (pooled - within) AUC over histogram resamples (and site
    resamples), all replicates at once (fedir.metrics.resample_histograms). A replicate
    counts when its pooled AUC and at least one site's AUC are defined; with fewer than
    half of them usable there is no interval."""
    if n_boot <= 0 or len(per_site) < 2:
        return None
    neg, pos = resample_histograms(*stack_histograms(per_site), n_boot, np.random.default_rng(seed),
                                   resample_sites=resample_sites)
    pooled = histogram_aucs(neg.sum(axis=1), pos.sum(axis=1))  # (n_boot,)
    site_auc = histogram_aucs(neg, pos)  # (n_boot, sites)
    defined = np.isfinite(site_auc)
    weight = np.where(defined, neg.sum(axis=2) + pos.sum(axis=2), 0.0)
    total = weight.sum(axis=1)
    usable = np.isfinite(pooled) & (total > 0)
    within = (weight * np.where(defined, site_auc, 0.0)).sum(axis=1)[usable] / total[usable]
    gaps = pooled[usable] - within
    if gaps.size < n_boot // 2:
        return None
    return [float(v) for v in np.percentile(gaps, [2.5, 97.5])]


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _within_auc(per_site: Mapping[str, dict], site_auc: Mapping[str, float | None]) -> float | None:
    """n-weighted mean of the defined site AUCs: each site counts as much as its test set."""
    defined = [(float(per_site[s]["n"]), auc) for s, auc in site_auc.items() if auc is not None]
    total = sum(n for n, _ in defined)
    return sum(n * auc for n, auc in defined) / total if total > 0 else None


def _mean_score(hist_neg, hist_pos) -> float | None:
    """Mean predicted score at bin centres (fixed equal bins on [0, 1])."""
    counts = np.asarray(hist_neg, dtype=float) + np.asarray(hist_pos, dtype=float)
    if counts.sum() == 0:
        return None
    centres = (np.arange(counts.size) + 0.5) / counts.size
    return float(counts @ centres / counts.sum())


def _most_separated(means: Mapping[str, float | None], pooled_mean: float) -> list[str]:
    deviation = {site: abs(m - pooled_mean) for site, m in means.items() if m is not None}
    if not deviation:
        return []
    largest = max(deviation.values())
    ranked = sorted(deviation, key=lambda site: deviation[site], reverse=True)
    return [site for site in ranked if deviation[site] >= NEAR_EXTREME * largest]


def _gap_reason(out: dict, pooled_mean: float) -> str:
    parts = []
    for site in out["sites"]:
        auc = out["site_auc"][site]
        within = f"within-site AUC {auc:.2f}" if auc is not None else f"within-site AUC undefined: {out['excluded'][site]}"
        parts.append(f"{site} mean score {out['site_mean_score'][site]:.2f} ({within})")
    unit = f"{out['level']}s"
    ci = "" if out["gap_ci"] is None else (
        f" [95% CI {out['gap_ci'][0]:.2f}, {out['gap_ci'][1]:.2f}, {unit} resampled within each site]")
    return (
        f"per {out['level']}, pooled AUC {out['pooled_auc']:.2f} exceeds the mean within-site AUC "
        f"{out['within_auc']:.2f} by {out['gap']:.2f}{ci} (> {out['thresholds']['max_gap']}): the model separates "
        f"sites; pooled mean score {pooled_mean:.2f}, " + "; ".join(parts)
    )


def _not_computable_reason(out: dict) -> str:
    if not out["site_auc"]:
        return "not computable: no sites reported test metrics"
    if out["pooled_auc"] is None:
        return "not computable: the pooled test set has only one class"
    return "not computable: no site has a defined within-site AUC (" + "; ".join(
        f"{site}: {why}" for site, why in out["excluded"].items()
    ) + ")"


# ---- verdict ------------------------------------------------------------------------------

# Each of these alone raises the alarm: the precondition of confounding (label depends on
# site) and its direct symptom (the model ranks across sites better than within them).
PRIMARY = ("site_label_association", "pooled_vs_within_auc", "pooled_vs_stratified_c",
           "foreground_by_site")  # segmentation (fedir.strategies.segmentation_bias)
# These measure how the hospitals differ (case mix, scanners), which clean federations show
# too: on the strongly shifted synthetic federations of generator v5 they fired about as
# often on clean federations as on confounded ones, and two of them together false-alarmed
# on 3 of 4 clean ones; every alarm on MedMNIST, Heart Disease and generator v3 had a
# primary beside them (benchmarks/README.md, "Re-judged under bias.secondary-to-alarm";
# benchmarks/results/bias_reverdict.json). So by default they only warn; the setting
# bias.secondary-to-alarm = k >= 1 lets k of them together raise the alarm.
SECONDARY = ("auc_heterogeneity", "site_separability", "cross_site",
             # survival (fedir.strategies.survival_bias)
             "c_index_heterogeneity", "survival_by_site", "follow_up_by_site",
             "dice_heterogeneity")  # segmentation
SECONDARY_TO_ALARM = 0  # the default of bias.secondary-to-alarm (fedir.config): secondaries never alarm


def verdict(tests: Mapping[str, dict], secondary_to_alarm: int = SECONDARY_TO_ALARM) -> dict:
    """Alarm if a primary test fires, or if `secondary_to_alarm` (>= 1) secondary tests fire
    together; with 0, secondary tests never raise it, however many fire.

    `reasons` are the sentences of the tests that raised the alarm (and of secondary tests
    that fired beside it, which corroborate); `warnings` are those of secondary tests that
    fired without raising it. Tests not in either list (none today) count as primary.
    `secondary_to_alarm` is returned with the verdict, so that a report can say the rule.
    """
    if secondary_to_alarm < 0:
        raise ValueError(f"secondary_to_alarm must be >= 0, got {secondary_to_alarm}")
    fired = [name for name, t in tests.items() if t.get("alarm")]
    primary = [n for n in fired if n not in SECONDARY]
    secondary = [n for n in fired if n in SECONDARY]
    alarm = bool(primary) or (secondary_to_alarm > 0 and len(secondary) >= secondary_to_alarm)
    return {
        "alarm": alarm,
        "reasons": [tests[n]["reason"] for n in (primary + secondary if alarm else [])],
        "warnings": [] if alarm else [tests[n]["reason"] for n in secondary],
        "secondary_to_alarm": secondary_to_alarm,
        "signals": fired,
        "tests": dict(tests),
    }
