"""The run summary (``summary.json``) and its terminal table, built only from the run store.

The summary describes the selected round (``selection``: the round `eval.select` chose
on the validation patients, fedir.strategies.selection, replayed here over the store's
validation rows exactly as the ServerApp chose it; the round of ``model.pt``): the pooled
("global") test metrics, every site's test metrics with confidence intervals (each with
``per_patient``, the primary level, its ECE and reliability rows; the pooled one with the
bound of its AUC's binning error), the decision threshold they were counted at and how it
was chosen (``threshold``), drift over time (``drift``: each site's per-period AUCs and
their trend, fedir.strategies.drift_trend), a fused model's per-input sensitivity analysis
(``sensitivity``, fedir.strategies.input_sensitivity), and the bias verdict. A metric that could not be computed is
null, and the site's ``reasons`` say why, so a reader never mistakes a missing number for
a bad one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedir.config import MEAN_AGGREGATORS
from fedir.metrics import CONFUSION_COUNTS, SCALAR_METRICS, SCORE_SUMS, calibration
from fedir.protocol import PRETRAINING_SCALARS, PRETRAINING_SPLITS, SENSITIVITY_KEY
from fedir.server.checklist import build_checklist, run_settings
from fedir.server.runstore import GLOBAL_SITE, RunStore
from fedir.strategies.drift_trend import pooled_trend, site_trend
from fedir.strategies.input_sensitivity import pooled_sensitivity
from fedir.strategies.privacy_budget import ACCOUNTANT
from fedir.strategies.selection import EarlyStopped, Selection
from fedir.tasks import task_of
from fedir.tasks.multiclass_metrics import CLASS_AUCS, CONFUSION, MULTICLASS_SCALARS, SENSITIVITY
from fedir.tasks.segmentation_metrics import DICE_HIST, FOREGROUND_NAMES, SEG_SCALARS
from fedir.tasks.survival_metrics import KM_AT_RISK, KM_SURVIVAL, SURVIVAL_SCALARS

NOT_COMPUTED = "not computed: no evaluation round was recorded"
NO_ANALYSIS = "not computed: no bias analysis was recorded for this run"

# Numbers of each bias test worth a glance in the one-line verdict (key, label).
VERDICT_NUMBERS = (
    ("p_value", "p"),
    ("cramers_v", "Cramer's V"),
    ("pooled_auc", "pooled AUC"),
    ("within_auc", "within-site AUC"),
    ("gap", "gap"),
    ("i2", "I^2"),
    ("site_accuracy", "site separability"),
    ("class_accuracy", "class separability"),
    ("pooled_c_index", "pooled C"),
    ("stratified_c_index", "site-stratified C"),
)


def build_summary(store: RunStore, run_id: str) -> dict:
    """Summarise ``run_id`` at its selected round (see the module docstring)."""
    run = store.run(run_id)
    selection = selection_entry(store, run_id, run["config"])
    last_eval = selection["round"]
    evaluated = store.site_metrics(run_id, last_eval) if last_eval is not None else {}
    sites = _site_names(run["sites"], evaluated)
    kind = run["config"].get("task.kind", "classification")
    classes = int(run["config"].get("task.classes", 2))
    if kind == "segmentation":
        entry = segmentation_entry
    elif kind != "classification":
        def entry(metrics: dict | None, server_round: int | None) -> dict:
            return survival_entry(metrics, server_round, run["config"].get("eval.time-bin-days", 180.0))
    elif classes > 2:
        entry = multiclass_entry
    else:
        entry = _entry
    summary = {
        "run_id": run_id,
        "scenario": run["scenario"],
        "status": run["status"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "rounds": store.last_round(run_id) or 0,
        "evaluated_round": last_eval,
        "selection": selection,
        "task": kind,
        "classes": classes,
        "sites": sites,
        "global": entry(evaluated.get(GLOBAL_SITE), last_eval),
        "per_site": {site: entry(evaluated.get(site), last_eval) for site in sites},
        "threshold": (threshold_entry(evaluated, sites) if classes == 2
                      else decision_entry(classes, run["config"].get("task.decision", "argmax"))),
        "drift": drift_entry(evaluated, sites, run["config"]),
        "sensitivity": sensitivity_entry(evaluated, sites, run["config"]),
        "bias": _verdict(store, run_id, last_eval),
        "privacy": privacy_entry(store, run_id, run["config"]),
        "nodes": store.nodes(run_id),
        "notes": store.notes(run_id),
        "model_init": model_init_entry(store, run_id, run["config"]),
        "pretraining": pretraining_entry(store, run_id, last_eval, sites, run["config"]),
    }
    summary["checklist"] = build_checklist(run["config"], summary)
    return summary


def pretraining_entry(store: RunStore, run_id: str, server_round: int | None, sites: list[str],
                      config: dict) -> dict | None:
    """A pretraining study's result (train.objective = simclr; fedir.client.pretraining):
    ``{"objective", "round", "per_site": {site: {"test": {...}, "val": {...}}}, "global"}``,
    each split's ``n_images``, ``contrastive_loss``, ``contrastive_chance`` and
    ``view_match``; ``global`` their means weighted by the images scored (null where no
    site scored any). None for any other objective (its sites score a classifier)."""
    if config.get("train.objective") != "simclr":
        return None
    out: dict[str, Any] = {"objective": "simclr", "round": server_round, "per_site": {}, "global": {},
                           "use": "model.pt is the next study's model.init; its projection.* entries are dropped there"}
    if server_round is None:
        return out
    for split in PRETRAINING_SPLITS:
        rows = store.site_metrics(run_id, server_round, split=split)
        for site in sites:
            row = rows.get(site) or {}
            out["per_site"].setdefault(site, {})[split] = {
                "n_images": int(row.get("n_images") or 0),
                **{name: row.get(name) for name in PRETRAINING_SCALARS}}
        scored = [(e[split]["n_images"], e[split]) for e in out["per_site"].values()
                  if e[split]["contrastive_loss"] is not None]
        total = sum(n for n, _ in scored)
        out["global"][split] = {"n_images": total, **{
            name: (sum(n * e[name] for n, e in scored) / total if total else None) for name in PRETRAINING_SCALARS}}
    return out


def model_init_entry(store: RunStore, run_id: str, config: dict) -> dict:
    """Where the first global model came from: `{"from": "random", "seed"}`, or `{"from":
    "checkpoint", ...}` with what `model.init` loaded, left new and dropped
    (fedir.server.model_init); with the encoder freezing the sites applied."""
    s = run_settings(config)
    report = store.model_init(run_id)
    start = {"from": "random", "seed": s["train.seed"]} if report is None else {"from": "checkpoint", **report}
    return {**start, "freeze": s["train.freeze"], "freeze_rounds": s["train.freeze-rounds"]}


def selection_entry(store: RunStore, run_id: str, config: dict) -> dict:
    """``{"round", "criterion", "score", "unit", "stopped_early", "stop_reason", "patience"}``:
    the round whose model is reported and saved, chosen by `eval.select` from the pooled
    validation metrics of each evaluated round (the test metrics are never read here),
    its validation AUC (``score``, null when not computed) and whether `train.patience`
    stopped the study (the early-stop note's message). ``round`` is null before any round
    was evaluated."""
    selection = Selection(config.get("eval.select", "val-auc"), config.get("train.patience", 0),
                          metric=task_of(config.get("task.kind", "classification")).SELECTION_METRIC)
    for server_round in store.evaluated_rounds(run_id):
        selection.offer(server_round, store.site_metrics(run_id, server_round, split="val").get(GLOBAL_SITE))
    stops = [n["message"] for n in store.notes(run_id) if n["kind"] == EarlyStopped.kind]
    return {
        "round": selection.round,
        "criterion": selection.describe() if selection.round is not None else NOT_COMPUTED,
        "score": selection.score,
        "metric": selection.metric,
        "unit": selection.unit,
        "stopped_early": bool(stops),
        "stop_reason": stops[-1] if stops else None,
        "patience": selection.patience,
    }


def selection_line(summary: dict) -> str:
    """"Selected round N of M: <criterion> (validation AUC x)", and the early stop if any:
    what the terminal says under the table of the selected round's test metrics."""
    selection = summary["selection"]
    if selection["round"] is None:
        return "Selected round: " + selection["criterion"]
    line = f"Selected round {selection['round']} of {summary['rounds']}: {selection['criterion']}{score_text(selection)}"
    return line + (f"\n{selection['stop_reason']}" if selection["stopped_early"] else "")


METRIC_NAMES = {"auc": "AUC", "c_index": "C-index", "dice": "Dice"}  # the task kinds' SELECTION_METRIC, as printed


def score_text(selection: dict) -> str:
    """" (validation AUC 0.812)": the selected round's score in the task kind's metric
    (a survival study's C-index), or "" when none was computed."""
    if selection.get("score") is None:
        return ""
    metric = selection.get("metric") or "auc"
    return f" (validation {METRIC_NAMES.get(metric, metric)} {selection['score']:.3f})"


def privacy_entry(store: RunStore, run_id: str, config: dict) -> dict:
    """`{"mode": "off", "secure_aggregation": ...}`, or under privacy.dp the epsilon spent by
    the rounds accounted at `delta` (fedir.strategies.privacy_budget; null when no noise made
    it infinite), each round's figure, and why the study stopped when the budget stopped it.
    `secure_aggregation` is `privacy.secure-aggregation`: "secagg+" when the coordinator saw
    only the sum of the sites' updates (fedir.strategies.secure_aggregation)."""
    mode = config.get("privacy.dp", "off")
    secure = config.get("privacy.secure-aggregation", "off")  # runs stored before the setting: off
    if mode == "off":
        return {"mode": "off", "secure_aggregation": secure}
    rounds = store.privacy_rounds(run_id)
    stopped = [n["message"] for n in store.notes(run_id) if n["kind"] == "privacy_budget"]
    accounted = config.get("strategy.name", "fedavg") in MEAN_AGGREGATORS
    return {
        "mode": mode,
        "epsilon": (rounds[-1]["epsilon"] if rounds else 0.0) if accounted else None,
        "delta": config.get("privacy.delta"),
        "noise_multiplier": config.get("privacy.noise-multiplier"),
        "max_epsilon": config.get("privacy.max-epsilon") or None,
        "rounds_accounted": len(rounds),
        "accountant": ACCOUNTANT if accounted else
        f"none: strategy.name = {config.get('strategy.name')!r} is not a mean, so no epsilon is accounted",
        "per_round": [[r["round"], r["epsilon"]] for r in rounds],
        "stopped": stopped[-1] if stopped else None,
        "secure_aggregation": secure,
    }


def _verdict(store: RunStore, run_id: str, last_eval: int | None) -> dict:
    """The verdict of the selected round; without any evaluation, "not computed"
    (alarm null, never false: a federation that was never analysed is not a clean one),
    keeping the site-label association, which needs only the training replies' label
    counts, when a round recorded it."""
    if last_eval is not None:
        verdict = store.bias(run_id, last_eval) or store.bias(run_id)
        if verdict is not None:
            return verdict
    recorded = store.bias(run_id) or {}
    tests = {name: test for name, test in (recorded.get("tests") or {}).items()
             if name == "site_label_association"}
    return {"alarm": None, "reasons": [NOT_COMPUTED if last_eval is None else NO_ANALYSIS], "tests": tests}


def _site_names(configured: list[str], evaluated: dict[str, dict]) -> list[str]:
    """The configured sites, then any site that reported without being configured."""
    extra = [s for s in evaluated if s != GLOBAL_SITE and s not in configured]
    return list(configured) + sorted(extra)


def _entry(metrics: dict | None, server_round: int | None, *, nested: bool = True) -> dict:
    """One site's (or the pooled) summary entry; every absent metric is null with a reason.
    `nested`: with the per-patient entry inside (the per-patient entry itself has none)."""
    metrics = metrics or {}
    reasons = dict(metrics.get("reasons") or {})
    entry: dict[str, Any] = {
        "n_test": metrics.get("n") or 0,
        "n_patients": metrics.get("n_patients"),
        "positives": metrics.get("positives"),
    }
    for name in SCALAR_METRICS:
        entry[name] = metrics.get(name)
        entry[name + "_ci"] = metrics.get(name + "_ci")
        if entry[name] is None and name not in reasons:
            reasons[name] = _missing_reason(metrics, server_round)
    for name in CONFUSION_COUNTS:
        entry[name] = metrics.get(name)
    entry.update(_calibration_and_binning(metrics))
    if not nested:
        entry["reasons"] = reasons
        return entry
    per_patient = metrics.get("per_patient")
    if "per_patient" in metrics and per_patient is None and "per_patient" not in reasons:
        reasons["per_patient"] = "not computed (no reason was reported)"
    if not metrics:
        reasons.setdefault("per_patient", _missing_reason(metrics, server_round))
    # one row per patient (mean score over a patient's images): the primary metrics where
    # labels are per patient; the per-image ones above stay beside them
    entry["per_patient"] = None if per_patient is None else _entry(per_patient, server_round, nested=False)
    entry["reasons"] = reasons
    return entry


def multiclass_entry(metrics: dict | None, server_round: int | None, *, nested: bool = True) -> dict:
    """One site's (or the pooled) entry of a K > 2 classification (task.classes): `auc` is
    the macro one-vs-rest AUC, `balanced_accuracy` beside it, each with `_ci`, `accuracy`
    too; `confusion` (K x K counts, rows = true class), `sensitivity_per_class` and
    `auc_per_class`; the pooled entry's `auc_binning_error`; `per_patient` nested (the
    patient's mean probability vector). Every absent metric is null with a reason."""
    metrics = metrics or {}
    reasons = dict(metrics.get("reasons") or {})
    entry: dict[str, Any] = {"n_test": metrics.get("n") or 0, "n_patients": metrics.get("n_patients"),
                             "classes": None if metrics.get("classes") is None else int(metrics["classes"])}
    for name in MULTICLASS_SCALARS:
        entry[name] = metrics.get(name)
        entry[name + "_ci"] = metrics.get(name + "_ci")
        if entry[name] is None and name not in reasons:
            reasons[name] = _missing_reason(metrics, server_round)
    for name in (CONFUSION, SENSITIVITY, CLASS_AUCS, "auc_binning_error"):
        entry[name] = metrics.get(name)
    if nested:
        per_patient = metrics.get("per_patient")
        if per_patient is None and "per_patient" not in reasons:
            reasons["per_patient"] = _missing_reason(metrics, server_round) if not metrics else \
                "not computed (no reason was reported)"
        entry["per_patient"] = None if per_patient is None else multiclass_entry(per_patient, server_round,
                                                                                 nested=False)
    entry["reasons"] = reasons
    return entry


def decision_entry(classes: int, decision: str) -> dict:
    """The threshold entry of a K > 2 study: there is none (`rule` argmax); the prediction is
    the argmax of the class probabilities, or of each over its training prevalence at the
    site (`decision`: task.decision = balanced, fedir.tasks.multiclass_metrics)."""
    rule = (f"the argmax of the {classes} class probabilities" if decision == "argmax" else
            f"the argmax of the {classes} class probabilities each divided by its prevalence among the site's "
            "labelled training patients (task.decision = balanced)")
    return {"rule": "argmax", "decision": decision, "value": None, "per_site": {}, "per_site_reasons": {},
            "reason": f"task.classes = {classes}: the prediction is {rule}; "
                      "a decision threshold (Youden's J) is a binary rule and does not apply"}


def survival_entry(metrics: dict | None, server_round: int | None, time_bin_days: float) -> dict:
    """One site's (or the pooled) survival entry: patients, events, Harrell's and Uno's
    C-index with CIs (`c_index`, `c_index_ci`, `uno_c_index`, ...), the IBS (null, with why),
    the pooled entry's binning bound and site-stratified C, and the site's k-suppressed
    Kaplan-Meier curve (`km`: survival at each time-bin end, at risk at each start, -1 =
    suppressed). Every absent metric is null with a reason."""
    metrics = metrics or {}
    reasons = dict(metrics.get("reasons") or {})
    entry: dict[str, Any] = {"n_test": metrics.get("n") or 0, "n_patients": metrics.get("n_patients"),
                             "events": metrics.get("events")}
    for name in SURVIVAL_SCALARS:
        entry[name] = metrics.get(name)
        entry[name + "_ci"] = metrics.get(name + "_ci")
        if entry[name] is None and name not in reasons:
            reasons[name] = _missing_reason(metrics, server_round)
    for name in ("c_index_binning_error", "stratified_c_index"):
        if name in metrics:
            entry[name] = metrics[name]
    has_km = metrics.get(KM_SURVIVAL) is not None
    entry["km"] = {"time_bin_days": time_bin_days, "survival": metrics[KM_SURVIVAL],
                   "at_risk": metrics[KM_AT_RISK]} if has_km else None
    entry["reasons"] = reasons
    return entry


def segmentation_entry(metrics: dict | None, server_round: int | None) -> dict:
    """One site's (or the pooled) segmentation entry (fedir.tasks.segmentation_metrics): the
    masked test images and patients, Dice and HD95 (pixels at the model's input size) with
    CIs (`dice`, `dice_ci`, `hd95`, `hd95_ci`), the images without foreground or without an
    HD95, the histogram of per-image Dice. Every absent metric is null with a reason."""
    metrics = metrics or {}
    reasons = dict(metrics.get("reasons") or {})
    entry: dict[str, Any] = {"n_test": metrics.get("n") or 0, "n_patients": metrics.get("n_patients")}
    for name in SEG_SCALARS:
        entry[name] = metrics.get(name)
        entry[name + "_ci"] = metrics.get(name + "_ci")
        if entry[name] is None and name not in reasons:
            reasons[name] = _missing_reason(metrics, server_round)
    for name in ("n_no_foreground", "n_no_hd95"):
        entry[name] = metrics.get(name)
    entry["dice_hist"] = metrics.get(DICE_HIST)
    entry["reasons"] = reasons
    return entry


def _calibration_and_binning(metrics: dict) -> dict[str, Any]:
    """The pooled AUC's binning error bound (pooled entries only), the ECE and the
    reliability rows (fedir.metrics.calibration) where the site sent score sums."""
    out: dict[str, Any] = {}
    if "auc_binning_error" in metrics:
        out["auc_binning_error"] = metrics["auc_binning_error"]
    out["ece"] = metrics.get("ece")
    has_sums = all(metrics.get(key) is not None for key in ("hist_neg", "hist_pos", SCORE_SUMS))
    out["reliability"] = calibration(metrics["hist_neg"], metrics["hist_pos"], metrics[SCORE_SUMS])["bins"] if has_sums else None
    return out


def drift_entry(evaluated: dict[str, dict], sites: list[str], config: dict) -> dict:
    """Drift over time at the selected round: ``{"setting", "per_site", "pooled", "reason"}``.
    ``per_site`` holds, for each site that sent per-period metrics (fedir.client.drift), its
    periods (label, patients, positives, per-patient AUC and CI, or why suppressed), its
    ``reason`` when it formed none, and its ``trend`` (fedir.strategies.drift_trend); ``pooled``
    the common within-site trend. ``reason`` says why there is nothing (the setting is off,
    or no site has an `acquired` column)."""
    setting = config.get("eval.drift-period", "year")
    reported = {site: (evaluated.get(site) or {}).get("drift") for site in sites}
    reported = {site: drift for site, drift in reported.items() if drift is not None}
    out: dict[str, Any] = {"setting": setting, "per_site": {}, "pooled": None, "reason": None}
    if setting == "off":
        out["reason"] = "eval.drift-period = off"
    elif not evaluated:
        out["reason"] = NOT_COMPUTED
    elif not reported:
        out["reason"] = "no site's manifest has an acquired column"
    else:
        out["per_site"] = {site: {**drift, "trend": site_trend(drift)} for site, drift in reported.items()}
        out["pooled"] = pooled_trend(reported)
    return out


def sensitivity_entry(evaluated: dict[str, dict], sites: list[str], config: dict) -> dict:
    """A fused model's sensitivity analysis at the selected round: ``{"inputs", "per_site",
    "pooled", "reason"}``. ``per_site`` holds what each site sent (fedir.client.input_sensitivity:
    its test patients' AUC and, per input changed, the AUC drop with its patient-bootstrap CI),
    ``pooled`` the drop per input across sites with its ranking (fedir.strategies.input_sensitivity).
    ``reason`` says why there is none: the model reads one kind of input, or nothing was evaluated."""
    inputs = config.get("data.inputs", "auto")
    out: dict[str, Any] = {"inputs": inputs, "per_site": {}, "pooled": None, "reason": None}
    reported = {site: (evaluated.get(site) or {}).get(SENSITIVITY_KEY) for site in sites}
    reported = {site: entry for site, entry in reported.items() if entry is not None}
    if "+" not in str(inputs):
        out["reason"] = f"data.inputs = {inputs}: the model reads one kind of input"
    elif not evaluated:
        out["reason"] = NOT_COMPUTED
    elif not reported:
        out["reason"] = "no site sent a sensitivity analysis"
    else:
        out["per_site"] = reported
        out["pooled"] = pooled_sensitivity(reported)
    return out


def threshold_entry(evaluated: dict[str, dict], sites: list[str]) -> dict | None:
    """The decision threshold the test metrics were computed at (fedir.strategies.thresholds):
    the federation's, with how it was chosen, and each site's (its own under
    eval.threshold-per-site). None before any evaluation."""
    pooled = evaluated.get(GLOBAL_SITE) or {}
    federation = pooled.get("threshold")
    if federation is None:
        return None
    per_site = {site: (evaluated.get(site) or {}).get("threshold") for site in sites}
    return {**federation, "per_site": {site: None if t is None else t["value"] for site, t in per_site.items()},
            "per_site_reasons": {site: t["reason"] for site, t in per_site.items() if t and t.get("reason")}}


def _missing_reason(metrics: dict, server_round: int | None) -> str:
    if server_round is None:
        return "no evaluation round was recorded"
    if not metrics:
        return f"no evaluation was reported in round {server_round}"
    return "not computed (no reason was reported)"


def write_summary(summary: dict, path: str | Path) -> Path:
    """Write strict JSON: a NaN raises instead of producing a file other tools reject."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def fmt_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_with_ci(value: float | None, ci: list | None) -> str:
    """``0.812 [0.700, 0.900]``; "n/a" for a metric that could not be computed."""
    if value is None:
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return fmt_value(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_site_table(summary: dict) -> str:
    """A plain-text per-site table (per patient first, the per-image AUC beside), the
    global row, the decision threshold, the verdict line and n/a footnotes."""
    if summary.get("task", "classification") == "segmentation":
        return format_segmentation_table(summary)
    if summary.get("task", "classification") != "classification":
        return format_survival_table(summary)
    if summary.get("classes", 2) > 2:
        return format_multiclass_table(summary)
    header = ["site", "patients", "positives", "AUC [95% CI]", "accuracy [95% CI]",
              "sensitivity [95% CI]", "specificity [95% CI]", "ECE", "images", "AUC per image [95% CI]"]
    rows = [_table_row(site, entry) for site, entry in summary["per_site"].items()]
    rows.append(_table_row(GLOBAL_SITE, summary["global"]))
    lines = site_table("Per patient (a patient's score: the mean over their images); the per-image AUC beside:", header, rows)
    lines.extend(binning_line(summary["global"]))
    lines.append(threshold_line(summary.get("threshold")))
    lines.append(verdict_line(summary["bias"]))
    lines.extend(_footnotes(summary))
    lines.extend(_failures(summary))
    return "\n".join(lines)


SEG_POOLED_LINE = "Pooled: patient-weighted mean of the sites' per-patient sums, normal 95% CI from their sums of squares."


def format_segmentation_table(summary: dict) -> str:
    """The segmentation study's per-site table: masked test patients and images, Dice,
    HD95 and the Dice of each foreground class with patient-bootstrap CIs (the pooled row's
    from the sites' sums); the verdict line."""
    header = ["site", "patients", "images", "Dice [95% CI]", "HD95 px [95% CI]",
              *(f"{name} Dice [95% CI]" for name in FOREGROUND_NAMES)]
    rows = [[site, _count(e.get("n_patients")), _count(e.get("n_test")),
             *(fmt_with_ci(e.get(name), e.get(name + "_ci")) for name in SEG_SCALARS)]
            for site, e in {**summary["per_site"], GLOBAL_SITE: summary["global"]}.items()]
    lines = [*site_table("Per patient (mean over a patient's masked images; foreground classes vessel and stenosis):", header, rows),
             SEG_POOLED_LINE,
             verdict_line(summary["bias"])]
    return "\n".join(lines)


def format_multiclass_table(summary: dict) -> str:
    """A K > 2 study's per-site table, per patient (the per-image set where labels are per
    image): macro one-vs-rest AUC, balanced accuracy, accuracy with CIs, the per-class
    sensitivity; the pooled AUC's binning bound, the argmax rule, the verdict line."""
    header = ["site", "patients", "macro AUC [95% CI]", "balanced accuracy [95% CI]", "accuracy [95% CI]",
              "sensitivity per class"]
    rows = []
    for site, e in {**summary["per_site"], GLOBAL_SITE: summary["global"]}.items():
        level = e.get("per_patient") or e
        rows.append([site if e.get("per_patient") else f"{site} (per image)", _count(level.get("n_test")),
                     *(fmt_with_ci(level.get(m), level.get(m + "_ci")) for m in MULTICLASS_SCALARS),
                     " / ".join(fmt_value(v) for v in level.get(SENSITIVITY) or [])])
    lines = site_table(f"Per patient (a patient's {summary['classes']} class probabilities: the mean over their images):", header, rows)
    bound = (summary["global"].get("per_patient") or summary["global"]).get("auc_binning_error")
    if bound is not None:
        lines.append(f"Pooled macro AUC: each class's within-site pairs exact, cross-site pairs ordered by score bins; "
                     f"error at most +-{bound:.3f} (eval.hist-bins). Pooled balanced accuracy: exact (summed confusion "
                     "counts).")
    lines.append(threshold_line(summary["threshold"]))
    lines.append(verdict_line(summary["bias"]))
    lines.extend(_footnotes(summary))
    lines.extend(_failures(summary))
    return "\n".join(lines)


def format_survival_table(summary: dict) -> str:
    """The survival study's per-site table: patients, events, Harrell's and Uno's C with
    CIs; the pooled row's C rebuilt from aggregates with its bound; the verdict line."""
    header = ["site", "patients", "events", "C-index [95% CI]", "Uno's C [95% CI]"]
    rows = [[site, _count(e.get("n_patients")), _count(e.get("events")),
             fmt_with_ci(e.get("c_index"), e.get("c_index_ci")), fmt_with_ci(e.get("uno_c_index"), e.get("uno_c_index_ci"))]
            for site, e in {**summary["per_site"], GLOBAL_SITE: summary["global"]}.items()]
    pooled = summary["global"]
    lines = site_table("Per patient (Harrell's C; Uno's C weights by the censoring distribution):", header, rows)
    if pooled.get("c_index_binning_error") is not None:
        lines.append(f"Pooled C-index: within-site pairs exact, cross-site pairs from binned risk x time x event "
                     f"counts; error at most +-{pooled['c_index_binning_error']:.3f}; site-stratified C "
                     f"{fmt_value(pooled.get('stratified_c_index'))}.")
    lines.append(verdict_line(summary["bias"]))
    lines.extend(_footnotes(summary))
    lines.extend(_failures(summary))
    return "\n".join(lines)


def site_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """The terminal's per-site table: the title, the header, the sites' rows and, below a
    rule, the last row (the pooled one), columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [title, line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), ""]


def _table_row(site: str, entry: dict) -> list[str]:
    """Per patient; a site without per-patient metrics (its labels are per image) shows its
    per-image ones instead, marked so."""
    patient = entry.get("per_patient")
    if patient is None and entry.get("n_test"):
        patient, site = {**entry, "n_test": entry.get("n_patients")}, f"{site} (per image)"
    patient = patient or {}
    positives = patient.get("positives")
    ece = patient.get("ece")
    return [
        site,
        _count(patient.get("n_test")),
        "n/a" if positives is None else str(positives),
        *(fmt_with_ci(patient.get(m), patient.get(m + "_ci")) for m in SCALAR_METRICS),
        fmt_value(ece),
        str(entry.get("n_test", 0)),
        fmt_with_ci(entry.get("auc"), entry.get("auc_ci")),
    ]


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def binning_line(pooled: dict) -> list[str]:
    """The bound of the pooled AUCs' binning error (fedir.metrics.pooled_auc_exact), per
    patient and per image; nothing when there is no pooled AUC."""
    bounds = [(level, (entry or {}).get("auc_binning_error"))
              for level, entry in (("per patient", pooled.get("per_patient")), ("per image", pooled))]
    shown = [f"{level} +-{bound:.3f}" for level, bound in bounds if bound is not None]
    if not shown:
        return []
    return ["Pooled AUC: within-site pairs exact, cross-site pairs ordered by score bins; binning error at most "
            + ", ".join(shown) + " (eval.hist-bins)."]


def threshold_line(threshold: dict | None) -> str:
    """How the decision threshold behind accuracy, sensitivity and specificity was chosen."""
    if threshold is None:
        return "Decision threshold: not recorded"
    if threshold["rule"] == "argmax":  # task.classes > 2
        return f"No decision threshold: {threshold['reason']}"
    if threshold["rule"] == "youden":
        text = (f"Decision threshold {threshold['value']:.3f}: Youden's J on the pooled validation patients "
                f"({(threshold.get('level') or 'per_patient').replace('_', ' ')}, J = {threshold['youden_j']:.3f}); "
                "test metrics at it")
    else:
        text = f"Decision threshold {threshold['value']:.3f}: fixed (eval.threshold)"
        if threshold.get("reason"):
            text += f", because {threshold['reason']}"
    own = {site: value for site, value in (threshold.get("per_site") or {}).items()
           if value is not None and value != threshold["value"]}
    if own:
        text += "; sites' own validation thresholds: " + ", ".join(f"{s} {v:.3f}" for s, v in own.items())
    return text + "."


def verdict_line(bias: dict) -> str:
    """"BIAS ALARM: <reasons>", "Bias verdict not computed: <why>; <numbers>" or "No bias
    alarm: <each test's key numbers>"."""
    if bias.get("alarm") is None:
        numbers = [f"{name}: {text}" for name, text in key_numbers(bias).items() if text]
        return "Bias verdict " + "; ".join([*(bias.get("reasons") or [NOT_COMPUTED]), *numbers])
    if bias.get("alarm"):
        return "BIAS ALARM: " + "; ".join(bias.get("reasons") or ["(no reason given)"])
    numbers = [f"{name}: {text}" for name, text in key_numbers(bias).items() if text]
    warnings = "".join(f" WARNING: {w}." for w in bias.get("warnings") or [])
    return "No bias alarm: " + ("; ".join(numbers) or "; ".join(bias.get("reasons") or [])) + warnings


def key_numbers(bias: dict) -> dict[str, str]:
    """``{test name: "p=0.42, Cramer's V=0.05"}`` from the numbers each test reports."""
    out = {}
    for name, test in (bias.get("tests") or {}).items():
        if isinstance(test, dict):
            out[name] = ", ".join(
                f"{label}={_short(test[key])}" for key, label in VERDICT_NUMBERS if key in test
            )
    return out


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def _failures(summary: dict) -> list[str]:
    """Each site's latest failure (a `missing` note): Flower's own log of it is silenced in
    a simulation (a page of Ray traceback per message), so the table says why."""
    latest = {n["site"]: n for n in summary["notes"] if n["kind"] == "missing"}
    lines = [f"  {site} (round {n['round']}): {n['message']}" for site, n in sorted(latest.items())]
    return ["", "Sites that failed (latest reason):", *lines] if lines else []


def _footnotes(summary: dict) -> list[str]:
    entries = {**summary["per_site"], GLOBAL_SITE: summary["global"]}
    notes = [
        f"  n/a {site} {level}{metric}: {why}"
        for site, entry in entries.items()
        for level, reasons in (("", entry["reasons"]), ("per patient ", (entry.get("per_patient") or {}).get("reasons") or {}))
        for metric, why in reasons.items()
    ]
    return ["", "Metrics not computed:", *notes] if notes else []
