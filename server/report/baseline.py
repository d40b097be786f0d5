"""The clinical-only baseline beside the imaging model, per site, with CIs.

An imaging model that cannot beat a logistic regression on age and sex has learnt
nothing worth deploying, and the reader can only tell if both sit in the same table. With
`baseline.clinical = true`, `fedir simulate` first runs a companion study of the same
sites on their clin_* columns alone (fedir.simulations.companion) into
`OUT/clinical-baseline/`, a complete run of its own (runs.sqlite, summary.json,
report.html). This module puts that run's final per-site metrics next to the imaging
run's: in summary.json (`clinical_baseline`), the report (one section) and the terminal.

Both models are tested on the same patients of each site (the patient-hash split is the
same for both inputs), and both per patient: the clinical sites are tables of one row per
patient, so the imaging model's per-patient metrics (the mean score over a patient's
images, fedir.metrics.patient_scores) are the like-for-like ones; a per-image imaging AUC
weighs a patient by their number of images and is not comparable. Each has its own
patient-bootstrap 95% CIs. Where a site has no per-patient imaging metrics (a patient's
images carry both labels) the imaging cell is n/a. No difference with a CI is given:
the two CIs come from separate bootstraps, and a paired comparison would need
per-patient scores, which never leave a site.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from markupsafe import Markup

from fedir.server.checklist import build_checklist
from fedir.server.report.render import render

COMPANION_DIR = "clinical-baseline"
CONFIG_KEY = "baseline.clinical"
SHOWN = ("n_test", "n_patients", "auc", "auc_ci", "accuracy", "accuracy_ci")


def companion_summary(out_dir: Path) -> dict | None:
    """The companion run's summary.json in OUT/clinical-baseline/, or None."""
    path = Path(out_dir) / COMPANION_DIR / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def comparison(imaging: dict, clinical: dict | None) -> dict:
    """Per site (and pooled): the imaging and the clinical model's test metrics.

    A site the companion did not evaluate gets `clinical: null` and a reason, never a
    number from elsewhere."""
    if clinical is None:
        return {"available": False, "reason": f"no {COMPANION_DIR}/summary.json was found next to this run"}

    def pick(entry: dict | None) -> dict | None:
        """An entry's per-patient metrics (a clinical site's rows are patients, so its
        per-patient entry equals its per-row one); None where there are none."""
        per_patient = None if entry is None else entry.get("per_patient")
        return None if per_patient is None else {k: per_patient.get(k) for k in SHOWN}

    sites = {
        site: {"imaging": pick(entry), "clinical": pick(clinical["per_site"].get(site))}
        for site, entry in imaging["per_site"].items()
    }
    return {
        "available": True,
        "run_id": clinical.get("run_id"),
        "evaluated_round": clinical.get("evaluated_round"),
        "per_site": sites,
        "global": {"imaging": pick(imaging["global"]), "clinical": pick(clinical["global"])},
        "missing": sorted(s for s, v in sites.items() if v["clinical"] is None),
        "units": {"imaging": "patients", "clinical": "patients"},
    }


def with_clinical_baseline(summary: dict, out_dir: Path, config: dict[str, Any]) -> dict:
    """`summary` with a `clinical_baseline` entry when the run asked for one (and its
    checklist redone, since one item is whether the baseline is there)."""
    if not config.get(CONFIG_KEY):
        return summary
    out = {**summary, "clinical_baseline": comparison(summary, companion_summary(out_dir))}
    return {**out, "checklist": build_checklist(config, out)}


def _ci(entry: dict | None, metric: str) -> str:
    if entry is None or entry.get(metric) is None:
        return "n/a"
    ci = entry.get(metric + "_ci")
    if not ci or ci[0] is None or ci[1] is None:
        return f"{entry[metric]:.3f}"
    return f"{entry[metric]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _n(entry: dict | None) -> str:
    return "n/a" if entry is None or entry.get("n_test") is None else str(entry["n_test"])


def _rows(cmp: dict) -> list[list[str]]:
    rows = []
    for site, pair in [*cmp["per_site"].items(), ("global (pooled)", cmp["global"])]:
        img, clin = pair["imaging"], pair["clinical"]
        rows.append([site, _n(img), _ci(img, "auc"), _ci(img, "accuracy"),
                     _n(clin), _ci(clin, "auc"), _ci(clin, "accuracy")])
    return rows


HEADER = ["site", "imaging n (patients)", "imaging AUC [95% CI]", "imaging accuracy [95% CI]",
          "clinical n (patients)", "clinical AUC [95% CI]", "clinical accuracy [95% CI]"]


def baseline_text(summary: dict) -> str:
    """The terminal table; "" when the run did not ask for a clinical baseline."""
    cmp = summary.get("clinical_baseline")
    if not cmp:
        return ""
    if not cmp["available"]:
        return f"Clinical baseline: not available ({cmp['reason']})"
    rows = [HEADER, *_rows(cmp)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(["Clinical-only baseline (clin_* columns) beside the imaging model, same test patients:",
                      lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def baseline_section(summary: dict) -> Markup:
    """The report's section (templates/baseline.html); empty when the run did not ask
    for a clinical baseline."""
    cmp = summary.get("clinical_baseline")
    if not cmp:
        return Markup("")
    if not cmp["available"]:
        return render("baseline.html", available=False, reason=cmp["reason"])
    return render("baseline.html", available=True, header=HEADER, rows=_rows(cmp),
                  run_id=cmp["run_id"], companion_dir=COMPANION_DIR)
