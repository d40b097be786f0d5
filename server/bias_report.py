"""The report's bias plots: what each Frankenstein signal saw, drawn for a study team.

Forest plot of the sites' AUCs (heterogeneity), pooled against within-site AUC with the
gap's interval, the embedding's site separability as a site x site heatmap, the
cross-site matrix as a heatmap, and the leave-one-site-out table. Everything is drawn
from the verdict's own numbers (summary.json `bias`), so the plots cannot disagree with it.
"""

from __future__ import annotations

from html import escape

import numpy as np

from fedir.server.plots import img, plt


def bias_plots_section(bias: dict) -> str:
    """The "What the bias signals saw" section (empty when no signal was recorded)."""
    tests = bias.get("tests") or {}
    parts = [
        _warnings(bias),
        _forest(tests.get("auc_heterogeneity")),
        _gap(tests.get("pooled_vs_within_auc")),
        _separability(tests.get("site_separability")),
        _cross_site(tests.get("cross_site")),
        _sensitivity(bias.get("sensitivity")),
    ]
    body = "".join(p for p in parts if p)
    return f"<h2>What the bias signals saw</h2>{body}" if body else ""


def _warnings(bias: dict) -> str:
    items = "".join(f"<li>{escape(str(w))}</li>" for w in bias.get("warnings") or [])
    if not items:
        return ""
    return ("<h3>Warnings (one corroborating signal fired; not enough for an alarm)</h3>"
            f"<ul>{items}</ul>")


def _forest(test: dict | None) -> str:
    if not test or not test.get("site_auc"):
        return ""
    sites = list(test["site_auc"])
    auc = np.array([test["site_auc"][s] for s in sites])
    half = 1.96 * np.array([test["site_se"][s] for s in sites])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(sites) + 1.4), dpi=100)
    y = np.arange(len(sites))[::-1] + 1
    ax.errorbar(auc, y, xerr=half, fmt="s", color="#1f4e79", capsize=3)
    if test.get("random_effects_auc") is not None:
        lo, hi = test["random_effects_ci"]
        m = test["random_effects_auc"]
        ax.fill([lo, m, hi, m], [0, 0.25, 0, -0.25], color="#c81e1e", alpha=0.8)
        ax.axvline(m, color="#c81e1e", linewidth=0.6, linestyle=":")
    ax.set_yticks([*y, 0], [*sites, "random effects"])
    ax.set_xlabel("test AUC with 95% CI")
    ax.grid(axis="x", alpha=0.3)
    q = "" if test.get("q") is None else (
        f"Cochran's Q {test['q']:.1f} (dof {test['dof']}, p = {test['p_value']:.2g}), "
        f"I&sup2; = {test['i2']:.0%}, tau&sup2; = {test['tau2']:.3g}.")
    return (f"<h3>Forest plot: per-site AUC</h3>{img(fig)}<p class=\"footnotes\">{q} Sites whose AUCs differ "
            "beyond their sampling error suggest the model works differently per hospital.</p>")


def _gap(test: dict | None) -> str:
    if not test or not test.get("computable"):
        return ""
    fig, ax = plt.subplots(figsize=(5, 2.2), dpi=100)
    ax.barh([1, 0], [test["pooled_auc"], test["within_auc"]], color=["#1f4e79", "#7b8794"])
    ax.set_yticks([1, 0], ["pooled (all sites' scores)", "within-site (mean)"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC")
    ci = test.get("gap_ci")
    interval = "" if ci is None else f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"
    return (f"<h3>Pooled against within-site AUC</h3>{img(fig)}<p class=\"footnotes\">Gap {test['gap']:.3f}"
            f"{escape(interval)}, threshold {test['thresholds']['max_gap']}. A model that ranks patients "
            "better across hospitals than within them is separating hospitals.</p>")


def _heatmap(matrix: dict[str, dict[str, float | None]], title: str, xlabel: str, ylabel: str) -> str:
    rows = sorted(matrix)
    cols = sorted({c for r in matrix.values() for c in r})
    data = np.array([[np.nan if matrix[r].get(c) is None else matrix[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.7 * len(rows) + 1.5), dpi=100)
    shown = ax.imshow(data, vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    return img(fig)


def _separability(test: dict | None) -> str:
    if not test or not test.get("computable"):
        return ""
    matrix: dict[str, dict[str, float | None]] = {}
    for pair, value in test["pairwise"].items():
        a, b = pair.split("|", 1)
        matrix.setdefault(a, {})[b] = value
        matrix.setdefault(b, {})[a] = value
    cls = test.get("class_accuracy")
    note = (f"Most identifiable site: {test['most_identifiable']} (accuracy {test['site_accuracy']:.2f}); classes "
            f"within sites: {'n/a' if cls is None else f'{cls:.2f}'}. 0.5 = indistinguishable.")
    plot = _heatmap(matrix, "site separability (same class)", "site", "site")
    return f"<h3>Site separability of the model's embedding</h3>{plot}<p class=\"footnotes\">{escape(note)}</p>"


def _cross_site(test: dict | None) -> str:
    if not test or not test.get("matrix"):
        return ""
    plot = _heatmap(test["matrix"], "AUC of each site's model", "test data of site", "model of site")
    note = "" if not test.get("computable") else (
        f"Own site {test['diagonal']:.2f}, other sites {test['off_diagonal']:.2f}, gap {test['gap']:.2f}.")
    return f"<h3>Cross-site evaluation</h3>{plot}<p class=\"footnotes\">{escape(note)}</p>"


def _sensitivity(sens: dict | None) -> str:
    if not sens or not sens.get("by_site"):
        return ""
    rows = "".join(
        f"<tr><td class=\"name\">{escape(site)}</td><td>{'ALARM' if e['alarm'] else 'no alarm'}</td>"
        f"<td class=\"name\">{escape(', '.join(e['signals']) or '-')}</td><td>{_auc(e['pooled_auc'])}</td></tr>"
        for site, e in sens["by_site"].items()
    )
    flags = "".join(f"<li>{escape(f)}</li>" for f in sens.get("flags") or [])
    flagged = f"<ul>{flags}</ul>" if flags else "<p>No conclusion changes when any one site is left out.</p>"
    return ("<h3>Leave one site out</h3><table><tr><th class=\"name\">without</th><th>verdict</th>"
            f"<th class=\"name\">signals</th><th>pooled AUC</th></tr>{rows}</table>{flagged}")


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
