"""The report's segmentation section (task.kind = segmentation): the Dice by round per site
with CI bands, and the selected round's per-site table (Dice and HD95 with patient-bootstrap
CIs, the pooled row from the sites' sums; templates/segmentation.html). It replaces the
classification sections (AUC tables, calibration, score histograms), which a label map
does not have. No pixel of a site's image is shown: a site sends none.
"""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.report.sites import _cell, _count, _series, metric_cell, table_entries

_METRICS = (("dice", "Dice [95% CI]"), ("hd95", "HD95, pixels [95% CI]"))


def segmentation_section(rows: list[dict], summary: dict) -> Markup:
    """The segmentation study's per-site results (see the module docstring)."""
    footnotes: list[str] = []
    table = []
    for site, entry, css in table_entries(summary):
        cells = [_cell(_count(entry.get("n_patients"))), _cell(_count(entry.get("n_test")))]
        cells += [metric_cell(entry, metric, f"{site},", footnotes) for metric, _ in _METRICS]
        table.append({"site": site, "css": css, "cells": cells})
    series = _series(rows, "test", "dice")
    return render(
        "segmentation.html",
        dice_png=figures.auc_by_round(series, summary["sites"], ylabel="Dice (test patients)") if series else None,
        evaluated_round=summary["evaluated_round"],
        header=["patients", "masked images", *(name for _, name in _METRICS)],
        rows=table,
        footnotes=footnotes,
    )
