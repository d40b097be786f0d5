"""The report's per-site sections: AUC by round, the final per-site tables (per patient
first, per image beside), calibration, score histograms, labels by site and training loss,
as data for their templates (sites.html, calibration.html, distributions.html, training.html).

Everything shown here is an aggregate the run store holds: metric rows, the sites' score
histograms, label counts. A metric a site could not compute is shown as "n/a" with its
reason as a numbered footnote, never as a number.
"""

from __future__ import annotations

from collections import defaultdict

from markupsafe import Markup

from fedir.metrics import SCALAR_METRICS
from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.runstore import GLOBAL_SITE, RunStore
from fedir.server.summary import binning_line, fmt_value, fmt_with_ci, threshold_line

_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                 "specificity": "specificity"}


def sites_section(store: RunStore, run_id: str, rows: list[dict], summary: dict) -> Markup:
    """AUC by round (per patient where the sites sent per-patient metrics; shown, never used
    to choose) and the selected round's per-site test metrics with their CIs: per patient
    first, per image beside."""
    series = _patient_series(store, run_id) or _series(rows, "test", "auc")
    footnotes: list[str] = []
    entries = table_entries(summary)
    patient_rows = [_patient_row(site, entry, footnotes, css) for site, entry, css in entries]
    image_rows = [_site_row(site, entry, footnotes, css) for site, entry, css in entries]
    return render(
        "sites.html",
        auc_png=figures.auc_by_round(series, summary["sites"]) if series else None,
        per_patient_series=bool(_patient_series(store, run_id)),
        evaluated_round=summary["evaluated_round"],
        patient_header=["patients", "positives", *(f"{_METRIC_NAMES[m]} [95% CI]" for m in SCALAR_METRICS), "ECE",
                        "AUC per image [95% CI]"],
        patient_rows=patient_rows,
        criterion=summary["selection"]["criterion"],
        header=["n test", "patients", "positives", *(f"{_METRIC_NAMES[m]} [95% CI]" for m in SCALAR_METRICS)],
        rows=image_rows,
        threshold=threshold_line(summary.get("threshold")),
        binning=" ".join(binning_line(summary["global"])),
        footnotes=footnotes,
    )


def _patient_row(site: str, entry: dict, footnotes: list[str], css: str) -> dict:
    """A site's per-patient metrics (the primary ones), its per-image AUC last; the pooled
    AUC carries the bound of its binning error."""
    patient = entry.get("per_patient")
    if patient is None:
        reason = str(entry["reasons"].get("per_patient", "no per-patient metrics were reported"))
        footnotes.append(f"{site}, per patient: {reason}")
        cells = [_cell("n/a", reason, len(footnotes)) for _ in range(3 + len(SCALAR_METRICS))]
        return {"site": site, "css": css, "cells": [*cells, _cell(fmt_with_ci(entry.get("auc"), entry.get("auc_ci")))]}
    row = _site_row(site, patient, footnotes, css, counts=("n_test", "positives"), level=" per patient")
    row["cells"].append(_cell(fmt_value(patient.get("ece"))))
    row["cells"].append(_cell(fmt_with_ci(entry.get("auc"), entry.get("auc_ci"))))
    return row


def _site_row(site: str, entry: dict, footnotes: list[str], css: str,
              counts: tuple[str, ...] = ("n_test", "n_patients", "positives"), level: str = "") -> dict:
    cells = [_cell(_count(entry.get(k))) for k in counts]
    cells += [metric_cell(entry, metric, f"{site},{level}", footnotes) for metric in SCALAR_METRICS]
    return {"site": site, "css": css, "cells": cells}


def table_entries(summary: dict) -> list[tuple[str, dict, str]]:
    """(row name, summary entry, css class) of every site, then of the pooled row: the rows of
    each task kind's per-site table."""
    return [*((site, entry, "") for site, entry in summary["per_site"].items()),
            (GLOBAL_SITE + " (pooled)", summary["global"], "global")]


def metric_cell(entry: dict, metric: str, where: str, footnotes: list[str]) -> dict:
    """One metric of a summary entry as a table cell: the value with its 95% CI (and the bound
    of its binning error where the entry carries `<metric>_binning_error`: a pooled value
    rebuilt from histograms), or "n/a" with the entry's reason appended to `footnotes` as
    "`where` `metric`: reason"."""
    value = entry.get(metric)
    if value is None:
        reason = str((entry.get("reasons") or {}).get(metric, "not computed"))
        footnotes.append(f"{where} {metric}: {reason}")
        return _cell("n/a", reason, len(footnotes))
    text = fmt_with_ci(value, entry.get(metric + "_ci"))
    if (error := entry.get(metric + "_binning_error")) is not None:
        text += f" \u00b1{error:.3f} binning"
    return _cell(text)


def calibration_section(summary: dict) -> Markup:
    """Reliability per site and pooled, per patient: a figure and the counts behind it."""
    entries = {**summary["per_site"], GLOBAL_SITE: summary["global"]}
    shown = {site: entry["per_patient"] for site, entry in entries.items()
             if (entry.get("per_patient") or {}).get("reliability")}
    tables = [{"site": site, "ece": fmt_value(patient.get("ece")),
               "rows": [[f"[{r['low']:.2f}, {r['high']:.2f})", str(r["count"]), str(r["positives"]),
                         f"{r['mean_score']:.3f}", f"{r['observed']:.3f}"] for r in patient["reliability"]]}
              for site, patient in shown.items()]
    return render("calibration.html", reliability_png=figures.reliability(shown) if shown else None, tables=tables)


def _cell(text: str, reason: str | None = None, footnote: int | None = None) -> dict:
    """A table cell: its text, or "n/a" with the reason (hover) and its footnote number."""
    return {"text": text, "reason": reason, "footnote": footnote}


def distributions_section(store: RunStore, run_id: str, summary: dict) -> Markup:
    """Score histograms per site and the label-by-site table."""
    table = _label_table(store, run_id, summary["bias"])
    classes = sorted({c for counts in table.values() for c in counts}, key=_class_order)
    label_rows = []
    for site, counts in table.items():
        total = sum(counts.values())
        cells = [str(counts.get(c, 0)) for c in classes] + [str(total)]
        cells += [f"{100 * counts.get(c, 0) / total:.1f}%" if total else "n/a" for c in classes]
        label_rows.append({"site": site, "cells": cells})
    return render("distributions.html", histograms_png=_histograms(store, run_id, summary),
                  classes=classes, label_rows=label_rows)


def _histograms(store: RunStore, run_id: str, summary: dict) -> str | None:
    """A site whose positives all score high is visible at once; None without histograms."""
    server_round = summary["evaluated_round"]
    if server_round is None:
        return None
    metrics = store.site_metrics(run_id, server_round)
    names = [s for s in [*summary["sites"], GLOBAL_SITE]
             if metrics.get(s, {}).get("hist_neg") is not None or metrics.get(s, {}).get("hist_pos") is not None]
    return figures.score_histograms(metrics, names) if names else None


def _label_table(store: RunStore, run_id: str, bias: dict) -> dict[str, dict[str, int]]:
    """The site-label table the bias test used, else the last recorded training label counts."""
    test = (bias.get("tests") or {}).get("site_label_association") or {}
    if isinstance(test.get("table"), dict) and test["table"]:
        return {str(s): {str(c): int(n) for c, n in row.items()} for s, row in test["table"].items()}
    latest: dict[str, dict[str, int]] = {}
    for vector in store.vectors(run_id):
        if vector["split"] == "train" and "label" in vector["name"] and isinstance(vector["json"], dict):
            latest[vector["site"]] = {str(c): int(n) for c, n in vector["json"].items()}
    return latest


def _class_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.lstrip("-").isdigit() else (1 << 30, name)


def training_section(rows: list[dict], sites: list[str]) -> Markup:
    """Local training loss by round (nothing when no site reported a loss)."""
    series = _series(rows, "train", "train_loss")
    return render("training.html", training_png=figures.training_loss(series, sites) if series else None)


def _patient_series(store: RunStore, run_id: str) -> figures.Series:
    """``{site: [(round, row), ...]}`` of the per-patient test AUC (stored in each round's
    ``per_patient`` vector), rows shaped like metric rows; {} when no site sent one."""
    out: figures.Series = defaultdict(list)
    for vector in store.vectors(run_id):
        patient = vector["json"]
        if vector["split"] != "test" or vector["name"] != "per_patient" or not isinstance(patient, dict):
            continue
        if patient.get("auc") is not None:
            ci = patient.get("auc_ci") or [None, None]
            out[vector["site"]].append((vector["round"], {"value": patient["auc"], "ci_low": ci[0], "ci_high": ci[1]}))
    return {site: sorted(points, key=lambda p: p[0]) for site, points in out.items()}


def _series(rows: list[dict], split: str, metric: str) -> figures.Series:
    """``{site: [(round, row), ...]}`` of one metric's non-null values, by round."""
    out: figures.Series = defaultdict(list)
    for row in rows:
        if row["split"] == split and row["metric"] == metric and row["value"] is not None:
            out[row["site"]].append((row["round"], row))
    return {site: sorted(points, key=lambda p: p[0]) for site, points in out.items()}


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)
