"""The report's bias sections, as data for templates/bias.html: what each Frankenstein
signal saw, drawn for a study team, then every bias test's numbers.

Forest plot of the sites' AUCs (heterogeneity), pooled against within-site AUC with the
gap's interval, the embedding's site separability as a site x site heatmap, the
cross-site matrix as a heatmap, and the leave-one-site-out table. Everything is drawn
from the verdict's own numbers (summary.json `bias`), so the plots cannot disagree with it.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.strategies.heterogeneity import METRICS

# Friendly names of the numbers bias tests report; unknown keys are shown as they are.
_LABELS = {
    "chi2": "chi-square", "chi_square": "chi-square", "dof": "degrees of freedom",
    "p_value": "p-value", "cramers_v": "Cramer's V", "pooled_auc": "pooled AUC",
    "within_auc": "mean within-site AUC", "gap": "gap (pooled - within)", "alarm": "alarm",
}
_SKIPPED_TEST_KEYS = {"table", "prevalence", "reason", "alarm", "matrix", "matrix_ci", "pairwise", "site_se",
                      "per_site_class_accuracy", "site_gap", "per_class"}


def bias_section(bias: dict) -> Markup:
    """"What the bias signals saw" (left out when no signal was recorded) and "Bias tests"."""
    tests = bias.get("tests") or {}
    signals = {
        "warnings": [str(w) for w in bias.get("warnings") or []],
        "forest": _forest(next((t for name, t in tests.items() if name.endswith("_heterogeneity")), None)),
        "gap": _gap(tests.get("pooled_vs_within_auc")),
        "separability": _separability(tests.get("site_separability")),
        "cross_site": _cross_site(tests.get("cross_site")),
        "sensitivity": _sensitivity(bias.get("sensitivity")),
    }
    blocks = [_test_block(name, test) for name, test in tests.items() if isinstance(test, dict)]
    return render("bias.html", signals=any(signals.values()), tests=blocks,
                  warning_rule=warning_rule(bias.get("secondary_to_alarm")), **signals)


def warning_rule(secondary_to_alarm: int | None) -> str:
    """The verdict rule that left these signals as warnings (fedir.strategies.bias.verdict);
    a verdict recorded before the rule was a setting carries none, and was judged by two."""
    if secondary_to_alarm is None:
        return "recorded before bias.secondary-to-alarm; two together raised it then"
    if secondary_to_alarm == 0:
        return "bias.secondary-to-alarm = 0, only a primary signal raises it"
    return f"bias.secondary-to-alarm = {secondary_to_alarm}, that many together raise it"


def _forest(test: dict | None) -> dict | None:
    """The forest plot of the kind's heterogeneity test (AUC, Dice, C-index)."""
    if not test or not test.get(f"site_{test.get('metric', 'auc')}"):
        return None
    q = "" if test.get("q") is None else (
        f"Cochran's Q {test['q']:.1f} (dof {test['dof']}, p = {test['p_value']:.2g}), "
        f"I\u00b2 = {test['i2']:.0%}, tau\u00b2 = {test['tau2']:.3g}.")
    metric = test.get("metric", "auc")  # verdicts recorded before the metric was named were AUCs
    return {"png": figures.forest(test), "q": q, "metric": METRICS[metric][0] if metric in METRICS else metric}


def _gap(test: dict | None) -> dict | None:
    if not test or not test.get("computable"):
        return None
    ci, ci_sites = test.get("gap_ci"), test.get("gap_ci_sites")
    # verdicts recorded before the gap had a level were per image
    level = test.get("level", "image")
    interval = "" if ci is None else f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}, {level}s resampled within each site]"
    sites = "" if ci_sites is None else (
        f" Resampling the sites too (would hospitals drawn like these show it?): [{ci_sites[0]:.3f}, {ci_sites[1]:.3f}].")
    why = f" {test['level_reason']}." if test.get("level_reason") else ""
    text = (f"Per {level}: gap {test['gap']:.3f}{interval}, threshold {test['thresholds']['max_gap']}; the alarm "
            f"needs the gap over the threshold and its interval above 0.{sites}{why}")
    return {"png": figures.pooled_against_within(test), "text": text}


def _separability(test: dict | None) -> dict | None:
    if not test or not test.get("computable"):
        return None
    matrix: dict[str, dict[str, float | None]] = {}
    for pair, value in test["pairwise"].items():
        a, b = pair.split("|", 1)
        matrix.setdefault(a, {})[b] = value
        matrix.setdefault(b, {})[a] = value
    cls = test.get("class_accuracy")
    text = (f"Most identifiable site: {test['most_identifiable']} (accuracy {test['site_accuracy']:.2f}); classes "
            f"within sites: {'n/a' if cls is None else f'{cls:.2f}'}. 0.5 = indistinguishable.")
    return {"png": figures.heatmap(matrix, "site separability (same class)", "site", "site"), "text": text}


# The colour scale of a cross-site matrix by its metric: an AUC's chance level is 0.5, a
# Dice's is near 0 (a model that segments nothing).
_CROSS_SITE_SCALE = {"auc": (0.5, 1.0)}


def _cross_site(test: dict | None) -> dict | None:
    """The matrix of the kind's metric (AUC, Dice: the test's `metric`) as a heatmap and as
    a table with each cell's site-computed CI."""
    if not test or not test.get("matrix"):
        return None
    metric = test.get("metric", "auc")  # verdicts recorded before the metric was named were AUCs
    label = METRICS[metric][0]
    text = "" if not test.get("computable") else (
        f"{label} of each site's own model: own site {test['diagonal']:.2f}, other sites {test['off_diagonal']:.2f}, "
        f"gap {test['gap']:.2f} [95% CI {test['gap_ci'][0]:.2f}, {test['gap_ci'][1]:.2f}], threshold "
        f"{test['thresholds']['max_gap']}; the signal (corroborating) fires when the gap is over the threshold and its interval above 0.")
    matrix, cis = test["matrix"], test.get("matrix_ci") or {}
    columns = sorted({d for row in matrix.values() for d in row})
    rows = [{"model": m, "cells": [_with_ci(matrix[m].get(d), (cis.get(m) or {}).get(d)) for d in columns]}
            for m in sorted(matrix)]
    png = figures.heatmap(matrix, f"{label} of each site's model", "test data of site", "model of site",
                          scale=_CROSS_SITE_SCALE.get(metric, (0.0, 1.0)))
    return {"png": png, "text": text, "label": label, "columns": columns, "rows": rows}


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def _sensitivity(sens: dict | None) -> dict | None:
    if not sens or not sens.get("by_site"):
        return None
    metric = sens.get("metric", "auc")  # verdicts recorded before the metric was named were AUCs
    rows = [{"site": site, "verdict": "ALARM" if e["alarm"] else "no alarm",
             "signals": ", ".join(e["signals"]) or "-", "pooled": _auc(e[f"pooled_{metric}"])}
            for site, e in sens["by_site"].items()]
    return {"rows": rows, "flags": [str(f) for f in sens.get("flags") or []],
            "metric": METRICS[metric][0]}


def _test_block(name: str, test: dict) -> dict:
    rows = [(_LABELS.get(k, k.replace("_", " ")), _fmt_any(v))
            for k, v in test.items() if k not in _SKIPPED_TEST_KEYS]
    return {"name": name.replace("_", " "), "alarm": bool(test.get("alarm")),
            "reason": str(test["reason"]) if test.get("reason") else "", "rows": rows}


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_any(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_fmt_any(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt_any(v) for v in value)
    return str(value)
