"""The checklist of common errors in small imaging studies, with each item's status for this run.

The review of AI in interventional radiology that issue 18 follows lists the errors that make
small studies over-optimistic: data split by image rather than by patient, choices (model,
threshold, hyper-parameters) made on the test set, no external validation, class imbalance
ignored, confidence intervals from the wrong unit, censoring ignored, leakage between the
splits, no clinical baseline, and, for a federation, the site confounding the label. Each
item's status is computed here from the run's settings (the run config in the store) and
from what the run measured (the summary built from the store), never typed in: change a
setting and the checklist changes with it. summary.json carries it as `checklist`, the
report as a table.

Statuses: "ok" (the run satisfies the item, the detail says how), "attention" (it does not,
or its result is a warning sign; the detail says why and what to do), "n/a" (the item does
not apply to this run, the detail says why) and "not checked" (the item applies, but
nothing the coordinator holds can tell; the detail says what the study team must check).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fedir.config import Settings

OK, ATTENTION, NA, NOT_CHECKED = "ok", "attention", "n/a", "not checked"
STATUSES = (OK, ATTENTION, NA, NOT_CHECKED)
IMBALANCED = 0.2  # a test prevalence below this (or above 1 - this) counts as imbalanced


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The run's flat settings, with fedir's defaults for any key the run config lacks (a
    run recorded before that setting existed ran with its default)."""
    defaults = {Settings.key_of(f.name): f.default for f in fields(Settings)}
    return {**defaults, **config}


def _item(item: str, status: str, detail: str) -> dict[str, str]:
    return {"item": item, "status": status, "detail": detail}


def build_checklist(config: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, str]]:
    """`[{"item", "status", "detail"}]` for the run whose run config is `config` and whose
    summary (fedir.server.summary.build_summary, with `clinical_baseline` when the
    companion study ran) is `summary`."""
    s = run_settings(config)
    return [
        _split(s), _selection(s, summary), _threshold(summary), _hyperparameters(),
        _external(s, summary), _imbalance(s, summary), _intervals(s, summary), _leakage(s),
        _baseline(s, summary), _sensitivity(s, summary), _censoring(s), _drift(summary), _confounding(summary),
    ]


def _split(s: dict) -> dict[str, str]:
    return _item("split by patient", OK, (
        f"enforced at every site: train/validation/test by a hash of patient_id (validation "
        f"{s['data.val-fraction']:g}, test {s['data.test-fraction']:g} of the patients), so all of a patient's "
        "images share one split; a manifest's own split column (a published benchmark split) overrides the "
        "hash, and a manifest whose rows put one patient in two splits is refused"))


def _selection(s: dict, summary: dict) -> dict[str, str]:
    selection = summary.get("selection") or {}
    chosen = selection.get("round")
    if s["eval.select"] == "last":
        return _item("model selection", OK, (
            f"eval.select = last: the last evaluated round ({chosen}), fixed before the study; "
            "no split chose it, the test split never does"))
    if chosen is None:
        return _item("model selection", ATTENTION, "no round was evaluated, so no model was selected")
    if selection.get("score") is None:  # no pooled validation AUC in any round: the last round kept
        return _item("model selection", OK, f"round {chosen}: {selection.get('criterion')}; the test split never chooses")
    return _item("model selection", OK, (
        f"round {chosen} chosen on the validation patients ({selection.get('criterion')}); "
        "the test patients are only reported"))


def _threshold(summary: dict) -> dict[str, str]:
    threshold = summary.get("threshold")
    item = "decision threshold"
    if threshold is None:
        return _item(item, NA, "no evaluation was recorded, so no threshold was applied")
    if threshold.get("rule") == "argmax":  # task.classes > 2
        return _item(item, NA, threshold["reason"])
    if threshold.get("rule") == "youden":
        return _item(item, OK, (
            f"{threshold['value']:.3f}, Youden's J on the pooled validation patients (eval.threshold-rule = youden); "
            "never on test"))
    why = f", because {threshold['reason']}" if threshold.get("reason") else ""
    return _item(item, OK, f"{threshold['value']:.3f}, fixed in advance (eval.threshold){why}; no split chose it")


def _hyperparameters() -> dict[str, str]:
    return _item("hyperparameters", NOT_CHECKED, (
        "fixed by the scenario before round 1 (fedir tunes none on any split); whether they were chosen "
        "by comparing earlier runs' test metrics is outside this run: compare runs on validation only"))


def _external(s: dict, summary: dict) -> dict[str, str]:
    tests = (summary.get("bias") or {}).get("tests") or {}
    cross = tests.get("cross_site")
    sensitivity = (summary.get("bias") or {}).get("sensitivity") or {}
    loso = ("leave-one-site-out recomputation of the pooled AUC and the verdict: "
            + ("present" if sensitivity.get("by_site") else f"absent ({sensitivity.get('reason') or 'not recorded'})"))
    if s["federation.arm"] == "pooled":
        return _item("external validation", ATTENTION, f"pooled arm: one model, no site held out of training; {loso}")
    if cross is not None and cross.get("computable", True):
        found = f" ({cross['reason']})" if cross.get("reason") else ""
        return _item("external validation", OK, (
            f"cross-site matrix: every site's model scored on every other site's test patients "
            f"(bias.cross-site){found}; {loso}"))
    return _item("external validation", ATTENTION, (
        "every site's test patients come from the sites that trained the model (internal validation only); "
        f"set bias.cross-site = true to score each site's model at the other sites, or hold a site out; {loso}"))


def _imbalance(s: dict, summary: dict) -> dict[str, str]:
    kind = s.get("task.kind", "classification")
    if kind == "segmentation":
        return _item("class imbalance", NA, "task.kind = segmentation: no class per patient (the Dice term of the "
                     "DiceCE loss and the Dice metric do not count the background pixels)")
    if kind != "classification":
        return _item("class imbalance", NA, f"task.kind = {kind}: no class label (events and censored patients: "
                     "see censoring)")
    pooled = summary.get("global") or {}
    level = pooled.get("per_patient") or pooled
    if int(s.get("task.classes", 2)) > 2:
        return _imbalance_classes(s, level)
    n, positives = level.get("n_test") or 0, level.get("positives")
    if not n or positives is None:
        return _item("class imbalance", NA, "no test patients were evaluated")
    prevalence = positives / n
    handling = ["AUC, which does not depend on prevalence"]
    if s["eval.threshold-rule"] == "youden":
        handling.append("a threshold chosen on validation (Youden's J), not 0.5")
    if s["train.smote"]:
        handling.append("SMOTE on tabular training rows")
    text = f"test prevalence {prevalence:.2f} ({positives} of {n}); handled by " + ", ".join(handling)
    if min(prevalence, 1 - prevalence) < IMBALANCED and s["eval.threshold-rule"] != "youden":
        return _item("class imbalance", ATTENTION, text + "; with a fixed threshold accuracy mostly counts the "
                     "majority class: use eval.threshold-rule = youden")
    return _item("class imbalance", OK, text)


def _imbalance_classes(s: dict, level: dict) -> dict[str, str]:
    """K > 2: the test class counts from the pooled confusion counts; the argmax decision
    with a class below IMBALANCED of the patients is a warning sign (it favours the common class)."""
    confusion = level.get("confusion")
    if not confusion or not sum(map(sum, confusion)):
        return _item("class imbalance", NA, "no test patients were evaluated")
    counts = [int(sum(row)) for row in confusion]
    n = sum(counts)
    text = (f"test classes {' / '.join(map(str, counts))} of {n}; handled by the macro one-vs-rest AUC and balanced "
            "accuracy (every class counts alike)")
    if s["task.decision"] == "balanced":
        return _item("class imbalance", OK, text + ", and the balanced decision (each class's probability over its "
                     "training prevalence, task.decision = balanced)")
    if min(counts) / n < IMBALANCED:
        return _item("class imbalance", ATTENTION, text + "; the argmax decision favours the common class, so "
                     "per-class sensitivity suffers: use task.decision = balanced")
    return _item("class imbalance", OK, text)


def _intervals(s: dict, summary: dict) -> dict[str, str]:
    pooled = summary.get("global") or {}
    if not s["eval.bootstrap"]:
        return _item("confidence intervals", ATTENTION, "eval.bootstrap = 0: the per-site metrics have no CIs")
    unit = "patients" if pooled.get("per_patient") is not None else "images (labels are per image)"
    return _item("confidence intervals", OK, (
        f"95% per site: bootstrap over {unit} ({s['eval.bootstrap']} resamples, images of a patient resampled "
        "together); pooled AUC: bootstrap over each site's score histograms; pooled rates: Wilson intervals "
        "over the summed counts"))


def _leakage(s: dict) -> dict[str, str]:
    steps = ["splits by patient before anything is fitted",
             "model, round and threshold chosen without the test patients"]
    steps.append("tabular features standardised with the training rows' statistics "
                 + ("of every site (data.standardise = federated)" if s["data.standardise"] == "federated"
                    else "of the site itself (data.standardise = site)"))
    if s["train.smote"]:
        steps.append("SMOTE rows made from training rows only, never stored or sent")
    if s["eval.adapt-bn"] or s["train.fedbn"]:
        steps.append("BatchNorm statistics re-estimated on the site's training images, labels unused")
    return _item("data leakage", OK, "; ".join(steps) + "; duplicated images across patients are not checked")


def _baseline(s: dict, summary: dict) -> dict[str, str]:
    if s["data.inputs"] in ("clinical", "radiomics") or s["model.name"] in ("logreg", "mlp"):
        return _item("clinical baseline", NA, f"this run is a tabular model itself (data.inputs = {s['data.inputs']}, "
                     f"model.name = {s['model.name']})")
    if not s["baseline.clinical"]:
        return _item("clinical baseline", ATTENTION, (
            "not run (baseline.clinical = false): nothing shows the imaging model beats age and sex; "
            "set baseline.clinical = true"))
    companion = summary.get("clinical_baseline") or {}
    if not companion.get("available"):
        return _item("clinical baseline", ATTENTION, f"asked for but not available: {companion.get('reason', 'not found')}")
    return _item("clinical baseline", OK, (
        f"companion logistic regression on clin_* (run {companion.get('run_id')}), per site beside the imaging "
        "model, the same test patients"))


def _sensitivity(s: dict, summary: dict) -> dict[str, str]:
    """The fused model's per-input drops (summary.json `sensitivity`): ok when every input was
    changed at some site and the pooled drops have CIs; the detail ranks them."""
    item = "sensitivity analysis (fused inputs)"
    if "+" not in str(s["data.inputs"]):
        return _item(item, NA, f"the model reads one kind of input (data.inputs = {s['data.inputs']})")
    entry = summary.get("sensitivity") or {}
    pooled = entry.get("pooled") or {}
    if entry.get("reason") or not pooled.get("inputs"):
        return _item(item, ATTENTION, "not available: " + (entry.get("reason") or pooled.get("reason")
                                                            or "no sensitivity analysis recorded"))
    ranked = "; ".join(f"{i['input']} {i['change']} {i['drop']:+.3f} [{i['drop_ci'][0]:+.3f}, {i['drop_ci'][1]:+.3f}]"
                       for i in pooled["inputs"])
    return _item(item, OK, (f"each input changed in turn at {len(entry['per_site'])} site(s)' test patients "
                            f"(clinical variables permuted, the image blank and blurred); pooled AUC drop "
                            f"[95% CI], largest first: {ranked}"))


def _censoring(s: dict) -> dict[str, str]:
    kind = s.get("task.kind", "classification")
    if kind != "survival":
        return _item("censoring", NA, f"task.kind = {kind}: no time-to-event outcome to censor")
    return _item("censoring", OK, (
        "a censored patient stays in the Cox partial likelihood's risk sets until its last follow-up (Efron's "
        "ties); Harrell's C counts only the pairs the follow-up can order, Uno's C weighs them by the inverse "
        "probability of censoring; the Kaplan-Meier counts keep the censored at risk until they leave"))


def _drift(summary: dict) -> dict[str, str]:
    """The trend test of the per-period AUCs (fedir.strategies.drift_trend): attention when the
    pooled or a site's slope has a 95% CI that excludes 0."""
    drift = summary.get("drift") or {}
    if drift.get("reason") or not drift.get("per_site"):
        reason = drift.get("reason") or "no per-period metrics"
        status = NA if reason in ("eval.drift-period = off", "no site's manifest has an acquired column") else NOT_CHECKED
        return _item("drift over time", status, reason)
    trends = {"pooled": drift.get("pooled") or {}, **{site: d.get("trend") or {} for site, d in drift["per_site"].items()}}
    tested = {name: t for name, t in trends.items() if t.get("slope") is not None and t.get("slope_ci")}
    if not tested:
        return _item("drift over time", NOT_CHECKED, "too few usable periods for a trend test ("
                     + "; ".join(f"{name}: {t.get('reason')}" for name, t in trends.items() if t.get("reason")) + ")")
    moving = {name: t for name, t in tested.items() if t["slope_ci"][0] > 0 or t["slope_ci"][1] < 0}
    def said(name: str, t: dict) -> str:
        return f"{name} {t['slope']:+.3f} [{t['slope_ci'][0]:+.3f}, {t['slope_ci'][1]:+.3f}] AUC per year"
    if moving:
        return _item("drift over time", ATTENTION, "the AUC moves with time: "
                     + "; ".join(said(n, t) for n, t in moving.items()))
    return _item("drift over time", OK, "no trend whose 95% CI excludes 0: "
                 + "; ".join(said(n, t) for n, t in tested.items()))


def _confounding(summary: dict) -> dict[str, str]:
    bias = summary.get("bias") or {}
    alarm = bias.get("alarm")
    if alarm is None:
        return _item("site confounding", NOT_CHECKED,
                     "verdict not computed: " + "; ".join(bias.get("reasons") or ["no analysis recorded"]))
    if alarm:
        return _item("site confounding", ATTENTION, "BIAS ALARM: " + "; ".join(bias.get("reasons") or []))
    warnings = bias.get("warnings") or []
    return _item("site confounding", ATTENTION if warnings else OK,
                 "no bias alarm" + "".join(f"; warning: {w}" for w in warnings))
