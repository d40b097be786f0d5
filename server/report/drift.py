"""The report's "Drift over time" section: each site's per-patient test AUC per acquisition
period with its CI (a figure and a table) and the trend test (templates/drift.html).

Everything comes from summary.json's ``drift`` entry (fedir.server.summary.drift_entry):
period labels and the aggregates the sites sent (fedir.client.drift), a suppressed period
shown as suppressed with its reason, never as a number, and the slopes of
fedir.strategies.drift_trend.
"""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.summary import fmt_with_ci
from fedir.strategies.drift_trend import UNIT


def drift_section(drift: dict) -> Markup:
    """Per site: a row per period; the trend per site and pooled; a line when there is none."""
    sites = drift["per_site"]
    tables = [{"site": site, "reason": entry.get("reason"), "rows": [_period_row(p) for p in entry["periods"]]}
              for site, entry in sites.items()]
    trends = [_trend_row(site, entry["trend"]) for site, entry in sites.items()]
    if drift["pooled"] is not None:
        trends.append(_trend_row("all sites (common slope)", drift["pooled"]))
    shown = {site: [p for p in entry["periods"] if p.get("auc") is not None] for site, entry in sites.items()}
    shown = {site: periods for site, periods in shown.items() if periods}
    method = drift["pooled"]["method"] if drift["pooled"] is not None else ""
    figure = figures.auc_by_period(shown, list(sites)) if shown else None
    return render("drift.html", reason=drift["reason"], setting=drift["setting"], tables=tables, trends=trends,
                  method=method, unit=UNIT, pooled=drift["pooled"] is not None, drift_png=figure)


def _period_row(period: dict) -> list[str]:
    if period.get("suppressed"):
        return [period["period"], "-", "-", f"suppressed: {period['suppressed']}"]
    return [period["period"], str(period["n_patients"]), str(period["positives"]),
            fmt_with_ci(period["auc"], period["auc_ci"])]


def _trend_row(name: str, trend: dict) -> list[str]:
    if trend["slope"] is None:
        return [name, str(trend["n_periods"]), "n/a", "n/a", f"not computed: {trend['reason']}"]
    return [name, str(trend["n_periods"]), fmt_with_ci(trend["slope"], trend["slope_ci"]),
            f"{trend['p_value']:.3g}", ""]
