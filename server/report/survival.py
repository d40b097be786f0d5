"""The report's survival section (task.kind = survival): the C-index by round, the selected
round's per-site table (Harrell's and Uno's C with patient-bootstrap CIs, events), the
pooled C-index rebuilt from aggregates with its bound, and each site's k-suppressed
Kaplan-Meier curve (templates/survival.html). It replaces the classification sections
(per-site AUC tables, calibration, score histograms), which a risk score does not have.
"""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.report.sites import _cell, _count, _series, metric_cell, table_entries
from fedir.server.summary import fmt_value

_METRICS = (("c_index", "Harrell's C [95% CI]"), ("uno_c_index", "Uno's C [95% CI]"))


def survival_section(rows: list[dict], summary: dict) -> Markup:
    """The survival study's per-site results (see the module docstring)."""
    footnotes: list[str] = []
    table = []
    for site, entry, css in table_entries(summary):
        cells = [_cell(_count(entry.get("n_patients"))), _cell(_count(entry.get("events")))]
        cells += [metric_cell(entry, metric, f"{site},", footnotes) for metric, _ in _METRICS]
        table.append({"site": site, "css": css, "cells": cells})
    curves = {site: entry["km"] for site, entry in summary["per_site"].items() if entry.get("km")}
    series = _series(rows, "test", "c_index")
    pooled = summary["global"]
    return render(
        "survival.html",
        c_png=figures.auc_by_round(series, summary["sites"], ylabel="Harrell's C (test patients)") if series else None,
        km_png=figures.kaplan_meier(curves, summary["sites"]) if curves else None,
        evaluated_round=summary["evaluated_round"],
        header=["patients", "events", *(name for _, name in _METRICS)],
        rows=table,
        stratified=fmt_value(pooled.get("stratified_c_index")),
        footnotes=footnotes,
    )
