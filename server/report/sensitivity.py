"""The report's "Sensitivity analysis" section for a fused model (data.inputs = image+clinical).

Everything comes from summary.json's ``sensitivity`` entry (fedir.server.summary.sensitivity_entry):
per site, the fused model's test AUC and, per input changed (each clinical variable permuted
within the site's test patients, the image blank and blurred), the AUC drop with its
patient-bootstrap 95% CI; and per input the drop pooled across sites
(fedir.strategies.input_sensitivity). Beside it, per site, the fused model's AUC and, when
`baseline.clinical` ran, the clinical-only model's (fedir.server.report.baseline): the
imaging-only model is a study of its own (benchmarks/fusion_sensitivity.py puts the three
side by side).
"""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.report.render import render
from fedir.server.summary import fmt_with_ci
from fedir.strategies.input_sensitivity import input_label


def sensitivity_section(summary: dict) -> Markup:
    """Nothing for a model of one kind of input; else the models' AUCs and the table of drops."""
    entry = summary.get("sensitivity") or {}
    if "+" not in str(entry.get("inputs", "")):
        return Markup("")
    sites = list(entry.get("per_site") or {})
    pooled = entry.get("pooled") or {}
    order = list(pooled.get("ranking") or [])
    for site in sites:
        for item in entry["per_site"][site]["inputs"]:
            if input_label(item) not in order:
                order.append(input_label(item))
    cells = {site: {input_label(i): fmt_with_ci(i["drop"], i["drop_ci"]) for i in entry["per_site"][site]["inputs"]}
             for site in sites}
    pooled_cells = {input_label(i): fmt_with_ci(i["drop"], i["drop_ci"]) for i in pooled.get("inputs") or []}
    rows = [[label, *(cells[site].get(label, "n/a") for site in sites), pooled_cells.get(label, "n/a")]
            for label in order]
    baseline = summary.get("clinical_baseline") or {}
    models = []
    for site in sites:
        fused = ((summary.get("per_site") or {}).get(site) or {}).get("per_patient") or {}
        clinical = ((baseline.get("per_site") or {}).get(site) or {}).get("clinical") if baseline.get("available") else None
        reason = entry["per_site"][site].get("reason")
        models.append([site, str(entry["per_site"][site]["n_patients"]), fmt_with_ci(fused.get("auc"), fused.get("auc_ci")),
                       "not run" if clinical is None else fmt_with_ci(clinical.get("auc"), clinical.get("auc_ci")),
                       reason or ""])
    first = next(iter(entry["per_site"].values()), {})
    return render("sensitivity.html", reason=entry.get("reason"), sites=sites, rows=rows, models=models,
                  method=pooled.get("method", ""), pooled_reason=pooled.get("reason"),
                  repeats=first.get("repeats"), blur=first.get("blur"))
