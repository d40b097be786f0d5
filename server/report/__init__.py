"""The run report: one self-contained HTML file, built only from the run store.

Written for the radiologist-researcher watching a study: the bias verdict first, then
the checklist of common errors with each item's status for this run, how each site's AUC
moved over the rounds, the final per-site metrics with their confidence intervals, per
patient first and per image beside, with the decision threshold and how it was chosen
(and the clinical-only baseline beside them, when the run asked for one), a fused model's
sensitivity analysis (each input's AUC drop, per site and pooled), each site's
calibration (reliability counts, ECE), the test AUC per acquisition period with its trend
test (drift over time), how scores and labels are spread over the sites, what each bias
signal saw and the numbers behind each test, where the first model came from (random, or
model.init's checkpoint), the training loss, the sites' data cards, and the notes
(skipped files, metrics that could not be computed). A segmentation study shows the Dice
by round, its per-site table and, after a simulation on a synthetic federation only, example
overlays of test frames that the simulation drew into the run folder (a real site sends no
pixels: fedir.server.report.segmentation).

Each section is one Jinja2 template in templates/, rendered with autoescape
(fedir.server.report.render): site names come from folder names, reasons and card
values from the sites, and none of them may turn into markup in a page opened on a
hospital workstation. The file references no external resource: figures are inline
base64 PNGs (fedir.server.report.figures), CSS is inline.
"""

from __future__ import annotations

from pathlib import Path

from fedir.server.report.baseline import baseline_section, with_baselines
from fedir.server.report.bias import bias_section
from fedir.server.report.cards import card_section
from fedir.server.report.drift import drift_section
from fedir.server.report.multiclass import multiclass_section
from fedir.server.report.overview import notes_section, summary_section
from fedir.server.report.render import render
from fedir.server.report.segmentation import segmentation_section
from fedir.server.report.sensitivity import sensitivity_section
from fedir.server.report.sites import calibration_section, distributions_section, sites_section, training_section
from fedir.server.report.study import checklist_section, model_init_section, pretraining_section
from fedir.server.report.survival import survival_section
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary


def write_report(store: RunStore, run_id: str, path: Path) -> Path:
    """Render ``run_id`` from ``store`` into the HTML file ``path`` and return it."""
    path = Path(path)
    summary = build_summary(store, run_id)
    with_baseline = with_baselines(summary, path.parent, store.run(run_id)["config"])
    rows = store.metric_rows(run_id)
    kind = summary.get("task", "classification")
    if kind != "classification":
        results = segmentation_section(rows, summary, path.parent) if kind == "segmentation" else survival_section(rows, summary)
        sections = [summary_section(summary, store.verdict_history(run_id)), results,
                    bias_section(summary["bias"]), training_section(rows, summary["sites"]),
                    notes_section(summary["notes"])]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render("report.html", run_id=run_id, sections=sections), encoding="utf-8")
        return path
    if summary.get("classes", 2) > 2:  # K probabilities, an argmax: no threshold, calibration or 2-class histograms
        sections = [summary_section(summary, store.verdict_history(run_id)),
                    checklist_section(with_baseline["checklist"]), multiclass_section(rows, summary),
                    pretraining_section(summary.get("pretraining")),
                    bias_section(summary["bias"]), model_init_section(summary["model_init"]),
                    training_section(rows, summary["sites"]), card_section(store.cards(run_id)),
                    notes_section(summary["notes"])]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render("report.html", run_id=run_id, sections=sections), encoding="utf-8")
        return path
    sections = [
        summary_section(summary, store.verdict_history(run_id)),
        checklist_section(with_baseline["checklist"]),
        sites_section(store, run_id, rows, summary),
        calibration_section(summary),
        baseline_section(with_baseline),
        sensitivity_section(with_baseline),
        distributions_section(store, run_id, summary),
        drift_section(summary["drift"]),
        pretraining_section(summary.get("pretraining")),
        bias_section(summary["bias"]),
        model_init_section(summary["model_init"]),
        training_section(rows, summary["sites"]),
        card_section(store.cards(run_id)),
        notes_section(summary["notes"]),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render("report.html", run_id=run_id, sections=sections), encoding="utf-8")
    return path
