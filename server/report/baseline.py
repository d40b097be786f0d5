"""The clinical-only and radiomics baselines beside the imaging model, per site, with CIs.

An imaging model that cannot beat a logistic regression on age and sex, or on a handful
of handcrafted image statistics, has learnt nothing worth deploying, and the reader can
only tell if all three sit in the same table. With `baseline.clinical = true`, `fedir
simulate` first runs a companion study of the same sites on their clin_* columns alone
into `OUT/clinical-baseline/`; with `baseline.radiomics = true`, one on each image's
first-order and GLCM features (`data.inputs = "radiomics"`, fedir.client.radiomics) into
`OUT/radiomics-baseline/` (fedir.simulations.companion); each a complete run of its own
(runs.sqlite, summary.json, report.html). This module puts those runs' final per-site
metrics next to the imaging run's: in summary.json (`clinical_baseline`,
`radiomics_baseline`), the report (one section, one table) and the terminal.

All are tested on the same patients of each site (the patient-hash split is the same for
every input), and all per patient: the clinical sites are tables of one row per patient,
so the imaging and radiomics models' per-patient metrics (the mean score over a patient's
images, fedir.metrics.patient_scores) are the like-for-like ones; a per-image AUC weighs a
patient by their number of images and is not comparable. Each has its own
patient-bootstrap 95% CIs. Where a site has no per-patient metrics (a patient's images
carry both labels) the cell is n/a. No difference with a CI is given: the CIs come from
separate bootstraps, and a paired comparison would need per-patient scores, which never
leave a site (`fedir compare` pairs them in a simulation, fedir.simulations.compare).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup

from fedir.server.checklist import build_checklist
from fedir.server.report.render import render

SHOWN = ("n_test", "n_patients", "auc", "auc_ci", "accuracy", "accuracy_ci")


@dataclass(frozen=True)
class Companion:
    """One companion study: its folder next to the imaging run, the setting that asks for
    it, its summary.json key, and how the report names and describes it."""

    folder: str
    config_key: str
    summary_key: str
    title: str
    what: str


COMPANIONS = {
    "clinical": Companion("clinical-baseline", "baseline.clinical", "clinical_baseline", "Clinical-only baseline",
                          "A logistic regression on each site's clin_* columns"),
    "radiomics": Companion("radiomics-baseline", "baseline.radiomics", "radiomics_baseline", "Radiomics baseline",
                           "A logistic regression on each image's IBSI first-order and GLCM features (the whole "
                           "image as the region; a patient's score the mean over their images)"),
}


def companion_summary(out_dir: Path, name: str = "clinical") -> dict | None:
    """The companion run's summary.json in OUT/<its folder>/, or None."""
    path = Path(out_dir) / COMPANIONS[name].folder / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def comparison(imaging: dict, companion: dict | None, name: str = "clinical") -> dict:
    """Per site (and pooled): the imaging and the companion `name`'s test metrics.

    A site the companion did not evaluate gets `<name>: null` and a reason, never a
    number from elsewhere."""
    if companion is None:
        return {"available": False, "reason": f"no {COMPANIONS[name].folder}/summary.json was found next to this run"}

    def pick(entry: dict | None) -> dict | None:
        """An entry's per-patient metrics (a clinical site's rows are patients, so its
        per-patient entry equals its per-row one); None where there are none."""
        per_patient = None if entry is None else entry.get("per_patient")
        return None if per_patient is None else {k: per_patient.get(k) for k in SHOWN}

    sites = {
        site: {"imaging": pick(entry), name: pick(companion["per_site"].get(site))}
        for site, entry in imaging["per_site"].items()
    }
    return {
        "available": True,
        "run_id": companion.get("run_id"),
        "evaluated_round": companion.get("evaluated_round"),
        "per_site": sites,
        "global": {"imaging": pick(imaging["global"]), name: pick(companion["global"])},
        "missing": sorted(s for s, v in sites.items() if v[name] is None),
        "units": {"imaging": "patients", name: "patients"},
    }


def with_baselines(summary: dict, out_dir: Path, config: dict[str, Any]) -> dict:
    """`summary` with a `clinical_baseline` and a `radiomics_baseline` entry for each
    companion the run asked for (and its checklist redone, since one item is whether the
    clinical baseline is there)."""
    asked = {name: c for name, c in COMPANIONS.items() if config.get(c.config_key)}
    if not asked:
        return summary
    out = {**summary, **{c.summary_key: comparison(summary, companion_summary(out_dir, name), name)
                         for name, c in asked.items()}}
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


def _cells(entry: dict | None) -> list[str]:
    return [_n(entry), _ci(entry, "auc"), _ci(entry, "accuracy")]


def _columns(name: str) -> list[str]:
    return [f"{name} n (patients)", f"{name} AUC [95% CI]", f"{name} accuracy [95% CI]"]


def _present(summary: dict) -> dict[str, dict]:
    """The companions this summary carries an entry for, by name, in COMPANIONS' order."""
    return {name: summary[c.summary_key] for name, c in COMPANIONS.items() if summary.get(c.summary_key)}


def _table(summary: dict) -> tuple[list[str], list[list[str]], dict[str, dict]]:
    """(header, rows, the available companions): one row per site and the pooled row, the
    imaging model's columns, then each available companion's."""
    shown = {name: cmp for name, cmp in _present(summary).items() if cmp["available"]}
    first = next(iter(shown.values()))
    header = ["site", *_columns("imaging"), *(col for name in shown for col in _columns(name))]
    rows = []
    for site in [*first["per_site"], "global (pooled)"]:
        pairs = {name: cmp["global"] if site == "global (pooled)" else cmp["per_site"].get(site, {})
                 for name, cmp in shown.items()}
        row = [site, *_cells(pairs[next(iter(shown))].get("imaging"))]
        for name in shown:
            row += _cells(pairs[name].get(name))
        rows.append(row)
    return header, rows, shown


def _unavailable(summary: dict) -> list[str]:
    return [f"{COMPANIONS[name].title}: not available ({cmp['reason']})"
            for name, cmp in _present(summary).items() if not cmp["available"]]


# what each companion's model reads, for the terminal table's heading
INPUTS = {"clinical": "clinical: clin_* columns", "radiomics": "radiomics: first-order and GLCM features"}


def _heading(names: dict) -> str:
    return " and ".join(COMPANIONS[name].title for name in names) + " beside the imaging model"


def baseline_text(summary: dict) -> str:
    """The terminal table; "" when the run asked for no baseline."""
    if not _present(summary):
        return ""
    lines = _unavailable(summary)
    if any(cmp["available"] for cmp in _present(summary).values()):
        header, rows, shown = _table(summary)
        table = [header, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        inputs = "; ".join(INPUTS[name] for name in COMPANIONS if name in shown)
        lines += [f"{_heading(shown)} ({inputs}), same test patients:",
                  text[0], "  ".join("-" * w for w in widths), *text[1:]]
    return "\n".join(lines)


def baseline_section(summary: dict) -> Markup:
    """The report's section (templates/baseline.html); empty when the run asked for no
    baseline."""
    present = _present(summary)
    if not present:
        return Markup("")
    heading = _heading(present)
    if not any(cmp["available"] for cmp in present.values()):
        return render("baseline.html", heading=heading, available=False, unavailable=_unavailable(summary))
    header, rows, shown = _table(summary)
    notes = [(COMPANIONS[name].what, cmp["run_id"], COMPANIONS[name].folder) for name, cmp in shown.items()]
    return render("baseline.html", heading=heading, available=True, header=header, rows=rows,
                  unavailable=_unavailable(summary), notes=notes)
