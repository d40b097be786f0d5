"""The report's multi-class section (task.classes = K > 2): the macro AUC by round, the
selected round's per-site table per patient (macro one-vs-rest AUC, balanced accuracy and
accuracy with patient-bootstrap CIs, the per-class sensitivity) and each site's K x K
confusion counts (templates/multiclass.html). It replaces the binary sections (the
threshold's confusion counts, calibration, the two-class score histograms), which K
probabilities and an argmax prediction do not have.
"""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.report.sites import _cell, _count, _series, metric_cell, table_entries
from fedir.server.summary import fmt_value
from fedir.tasks.multiclass_metrics import CONFUSION, MULTICLASS_SCALARS, SENSITIVITY

_NAMES = {"auc": "macro AUC [95% CI]", "balanced_accuracy": "balanced accuracy [95% CI]",
          "accuracy": "accuracy [95% CI]"}


def multiclass_section(rows: list[dict], summary: dict) -> Markup:
    """The K > 2 study's per-site results (see the module docstring)."""
    footnotes: list[str] = []
    table, confusions = [], []
    for site, entry, css in table_entries(summary):
        level = entry.get("per_patient") or entry  # per image where labels are per image
        label = site if entry.get("per_patient") else f"{site} (per image)"
        cells = [_cell(_count(level.get("n_test")))]
        cells += [metric_cell(level, metric, f"{label},", footnotes) for metric in MULTICLASS_SCALARS]
        cells.append(_cell(" / ".join(fmt_value(v) for v in level.get(SENSITIVITY) or [])))
        table.append({"site": label, "css": css, "cells": cells})
        if level.get(CONFUSION):
            confusions.append({"site": label, "matrix": level[CONFUSION]})
    series = _series(rows, "test", "auc")
    return render(
        "multiclass.html",
        auc_png=figures.auc_by_round(series, summary["sites"], ylabel="macro one-vs-rest AUC (test)") if series
        else None,
        evaluated_round=summary["evaluated_round"],
        classes=summary["classes"],
        header=["patients", *(_NAMES[m] for m in MULTICLASS_SCALARS), "sensitivity per class"],
        rows=table,
        confusions=confusions,
        reason=(summary.get("threshold") or {}).get("reason", ""),
        footnotes=footnotes,
    )
