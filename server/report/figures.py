"""The report's figures: matplotlib (Agg), each returned as a base64 PNG.

The report must open on a hospital workstation with no network, so a figure travels
inside the HTML as a data URI. A figure is passed to the templates as data (the PNG's
base64 text, which holds no markup); the labels drawn into it are pixels, not HTML.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fedir.server.runstore import GLOBAL_SITE  # noqa: E402
from fedir.strategies.drift_trend import period_time  # noqa: E402
from fedir.strategies.heterogeneity import METRICS  # noqa: E402

Series = dict[str, list[tuple[int, dict]]]  # site -> [(round, metric row), ...]


def png(fig: Any) -> str:
    """The figure as base64 PNG text (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def site_colours(sites: list[str]) -> dict[str, str]:
    """One colour per site for every plot, so a site is recognisable across figures."""
    palette = plt.get_cmap("tab10" if len(sites) <= 10 else "tab20").colors
    colours = {site: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, site in enumerate(sites)}
    return {**colours, GLOBAL_SITE: "#000000"}


def auc_by_round(series: Series, sites: list[str], ylabel: str = "AUC (test patients)") -> str:
    """Each site's test AUC (or `ylabel`'s metric) per round with its CI band; the pooled one thick and black."""
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=100)
    colours = site_colours(sites)
    for site in [*sites, GLOBAL_SITE]:
        if series.get(site):
            _plot_with_band(ax, site, colours[site], series[site])
    ax.axhline(0.5, color="#9aa5b1", linewidth=0.8, linestyle=":")
    ax.set(xlabel="round", ylabel=ylabel, ylim=(0, 1.02))
    ax.set_xticks(sorted({r for points in series.values() for r, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return png(fig)


def _plot_with_band(ax: Any, site: str, colour: str, points: list[tuple[int, dict]]) -> None:
    rounds = [r for r, _ in points]
    values = [p["value"] for _, p in points]
    width = 2.5 if site == GLOBAL_SITE else 1.5
    ax.plot(rounds, values, marker="o", markersize=4, label=site, color=colour, linewidth=width)
    banded = [(r, p["ci_low"], p["ci_high"]) for r, p in points if p["ci_low"] is not None]
    if banded:
        r, lo, hi = zip(*banded)
        ax.fill_between(r, lo, hi, color=colour, alpha=0.12 if site == GLOBAL_SITE else 0.18)


def kaplan_meier(curves: dict[str, dict], sites: list[str]) -> str:
    """Each site's KM survival at its time-bin ends (a step curve from 1 at day 0), cut
    where the site suppressed it (-1: fewer than k at risk)."""
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=100)
    colours = site_colours(sites)
    for site, km in curves.items():
        width = float(km["time_bin_days"])
        times, values = [0.0], [1.0]
        for b, value in enumerate(km["survival"]):
            if value < 0:
                break
            times.append((b + 1) * width)
            values.append(value)
        ax.step(times, values, where="post", label=site, color=colours.get(site))
    ax.set(xlabel="days", ylabel="survival (Kaplan-Meier)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return png(fig)


def training_loss(series: Series, sites: list[str]) -> str:
    """Each site's local training loss per round."""
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    colours = site_colours(sites)
    for site in sites:
        if series.get(site):
            ax.plot([r for r, _ in series[site]], [p["value"] for _, p in series[site]],
                    marker="o", markersize=4, label=site, color=colours[site])
    ax.set(xlabel="round", ylabel="local training loss")
    ax.set_xticks(sorted({r for points in series.values() for r, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return png(fig)


def score_histograms(metrics: dict[str, dict], names: list[str]) -> str:
    """One panel per site: the score histograms of its negatives and positives."""
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, site in zip(axes.flat, names):
        _plot_histogram(ax, site, metrics[site])
    axes.flat[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return png(fig)


def _plot_histogram(ax: Any, site: str, metrics: dict) -> None:
    for key, colour, label in (("hist_neg", "#1f77b4", "negative"), ("hist_pos", "#d62728", "positive")):
        counts = metrics.get(key) or []
        if counts:
            width = 1.0 / len(counts)
            edges = [i * width for i in range(len(counts))]
            ax.bar(edges, counts, width=width, align="edge", color=colour, alpha=0.5, label=label)
    ax.set_title(site, fontsize=9)
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("score", fontsize=7)


def reliability(per_patient: dict[str, dict]) -> str:
    """One panel per site: each score bin's mean predicted score against its observed rate
    of positives, the marker's area by its number of patients; the diagonal is calibration."""
    names = list(per_patient)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, site in zip(axes.flat, names):
        bins = per_patient[site]["reliability"]
        ax.plot([0, 1], [0, 1], color="#9aa5b1", linewidth=0.8, linestyle=":")
        ax.scatter([b["mean_score"] for b in bins], [b["observed"] for b in bins],
                   s=[12 + 6 * b["count"] for b in bins], color="#1f4e79", alpha=0.6)
        ece = per_patient[site].get("ece")
        ax.set_title(site + ("" if ece is None else f" (ECE {ece:.3f})"), fontsize=9)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("mean predicted score", fontsize=7)
        ax.set_ylabel("observed positives", fontsize=7)
    fig.tight_layout()
    return png(fig)


def forest(test: dict) -> str:
    """Per-site values of a heterogeneity test's metric (AUC, Dice, C-index:
    fedir.strategies.heterogeneity) with 95% CIs and the random-effects estimate as a diamond."""
    metric = test.get("metric", "auc")  # verdicts recorded before the metric was named were AUCs
    values = test[f"site_{metric}"]
    sites = list(values)
    auc = np.array([values[s] for s in sites])
    half = 1.96 * np.array([test["site_se"][s] for s in sites])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(sites) + 1.4), dpi=100)
    y = np.arange(len(sites))[::-1] + 1
    ax.errorbar(auc, y, xerr=half, fmt="s", color="#1f4e79", capsize=3)
    if test.get(f"random_effects_{metric}") is not None:
        lo, hi = test["random_effects_ci"]
        m = test[f"random_effects_{metric}"]
        ax.fill([lo, m, hi, m], [0, 0.25, 0, -0.25], color="#c81e1e", alpha=0.8)
        ax.axvline(m, color="#c81e1e", linewidth=0.6, linestyle=":")
    ax.set_yticks([*y, 0], [*sites, "random effects"])
    ax.set_xlabel(f"test {METRICS[metric][0] if metric in METRICS else metric} with 95% CI")
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def pooled_against_within(test: dict) -> str:
    """Two bars: the pooled AUC and the mean within-site AUC."""
    fig, ax = plt.subplots(figsize=(5, 2.2), dpi=100)
    ax.barh([1, 0], [test["pooled_auc"], test["within_auc"]], color=["#1f4e79", "#7b8794"])
    ax.set_yticks([1, 0], ["pooled (all sites' scores)", "within-site (mean)"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC")
    return png(fig)


def heatmap(matrix: dict[str, dict[str, float | None]], title: str, xlabel: str, ylabel: str,
            scale: tuple[float, float] = (0.5, 1.0)) -> str:
    """A site x site matrix of values on `scale` (AUC-like: [0.5, 1]; Dice: [0, 1]), each cell labelled."""
    rows = sorted(matrix)
    cols = sorted({c for r in matrix.values() for c in r})
    data = np.array([[np.nan if matrix[r].get(c) is None else matrix[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.7 * len(rows) + 1.5), dpi=100)
    shown = ax.imshow(data, vmin=scale[0], vmax=scale[1], cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    return png(fig)


def auc_by_period(periods: dict[str, list[dict]], sites: list[str]) -> str:
    """Each site's per-patient test AUC per acquisition period with its 95% CI as error bars,
    sites side by side (a small offset each) on one time axis."""
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=100)
    colours = site_colours(sites)
    offsets = np.linspace(-0.08, 0.08, len(periods)) if len(periods) > 1 else [0.0]
    labels: dict[float, str] = {}
    for offset, (site, rows) in zip(offsets, periods.items()):
        t = np.array([period_time(p["period"]) for p in rows])
        labels.update(zip(t.tolist(), (p["period"] for p in rows)))
        auc = np.array([p["auc"] for p in rows])
        ci = np.array([p["auc_ci"] if p["auc_ci"] is not None else [a, a] for p, a in zip(rows, auc)])
        ax.errorbar(t + offset, auc, yerr=[auc - ci[:, 0], ci[:, 1] - auc], fmt="o-", capsize=3,
                    markersize=4, linewidth=1.2, color=colours[site], label=site)
    ax.axhline(0.5, color="#9aa5b1", linewidth=0.8, linestyle=":")
    ax.set_xticks(sorted(labels), [labels[t] for t in sorted(labels)])
    ax.set(xlabel="period of acquisition", ylabel="AUC (test patients)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return png(fig)
