"""A small finished run written straight into runs.sqlite, for the run store and report tests.

Three sites and two rounds, site-b's AUC null with a reason, an alarm on the label-by-site
association: what a report must show, made in milliseconds (tests/conftest.py's `store`).
"""

from __future__ import annotations

from pathlib import Path

from fedir.server.runstore import RunStore

SITES = ["site-a", "site-b", "site-c"]
RUN = "run-1"


def site_eval(n: int, positives: int, auc: float | None) -> dict:
    """A site's evaluation aggregates in the shape ``fedir.metrics.site_metrics`` returns."""
    entry = {
        "n": n, "n_patients": n // 3, "positives": positives,
        "auc": auc, "auc_ci": None if auc is None else [auc - 0.1, min(auc + 0.08, 1.0)],
        "accuracy": 0.75, "accuracy_ci": [0.64, 0.85],
        "sensitivity": 0.7, "sensitivity_ci": [0.5, 0.85],
        "specificity": 0.8, "specificity_ci": [0.66, 0.9],
        "tp": 17, "tn": 28, "fp": 7, "fn": 7,
        "hist_neg": [max(0, 8 - i) for i in range(20)], "hist_pos": [max(0, i - 10) for i in range(20)],
        "reasons": {},
    }
    if auc is None:
        entry["reasons"] = {"auc": "only one class among the test patients"}
    return entry


THRESHOLD = {"value": 0.45, "rule": "youden", "chosen_on": "validation", "youden_j": 0.31,
             "level": "per_patient", "reason": None}


def stored_round(server_round: int) -> tuple[dict[str, dict], dict]:
    """A round's per-site and pooled entries as the ServerApp stores them."""
    per_site = {site: with_patients(entry, None if entry["auc"] is None else entry["auc"] - 0.05, THRESHOLD)
                for site, entry in round_eval(server_round).items()}
    pooled = with_patients(site_eval(135, 36, 0.78 + 0.02 * server_round), 0.74 + 0.02 * server_round, THRESHOLD,
                           binning_error=0.004)
    return per_site, pooled


def with_patients(entry: dict, auc: float | None, threshold: dict, binning_error: float | None = None) -> dict:
    """`entry` as the ServerApp stores it: with score sums, a per-patient entry (AUC `auc`,
    one patient per three images), the decision threshold and, for the pool, the binning bound."""
    def sums(neg: list[int], pos: list[int]) -> list[float]:  # every score at its bin's centre
        return [round((i + 0.5) / len(neg) * (n + p), 3) for i, (n, p) in enumerate(zip(neg, pos))]

    patient = {**site_eval(entry["n_patients"], entry["positives"] // 3 if auc is not None else 0, auc),
               "n_patients": entry["n_patients"], "hist_neg": [c // 3 for c in entry["hist_neg"]],
               "hist_pos": [c // 3 for c in entry["hist_pos"]], "ece": 0.08, "threshold": threshold}
    patient["hist_score_sum"] = sums(patient["hist_neg"], patient["hist_pos"])
    out = {**entry, "hist_score_sum": sums(entry["hist_neg"], entry["hist_pos"]), "ece": 0.06, "threshold": threshold,
           "per_patient": patient}
    if binning_error is not None:
        out["auc_binning_error"] = binning_error
        patient["auc_binning_error"] = 2 * binning_error
    return out


def round_eval(server_round: int) -> dict[str, dict]:
    return {
        "site-a": site_eval(60, 24, 0.70 + 0.05 * server_round),
        "site-b": site_eval(45, 0, None),
        "site-c": site_eval(30, 12, 0.60 + 0.05 * server_round),
    }


VERDICT = {
    "alarm": True,
    "reasons": ["label prevalence differs strongly between sites (Cramer's V 0.62)"],
    "tests": {
        "site_label_association": {
            "alarm": True, "chi2": 41.3, "dof": 2, "p_value": 1.1e-9, "cramers_v": 0.62,
            "threshold_p": 0.01, "threshold_v": 0.3,
            "table": {"site-a": {"0": 20, "1": 20}, "site-b": {"0": 40, "1": 0},
                      "site-c": {"0": 5, "1": 30}},
            "prevalence": {"site-a": 0.5, "site-b": 0.0, "site-c": 0.857},
            "reason": "label prevalence differs strongly between sites",
        },
        "pooled_vs_within_auc": {
            "alarm": False, "pooled_auc": 0.80, "within_auc": 0.74, "gap": 0.06, "threshold_gap": 0.1,
            "reason": "pooled AUC within 0.1 of the within-site AUC",
        },
    },
}


def fabricate(path: Path, sites: list[str] = SITES) -> RunStore:
    """A finished 3-site, 2-round run; site-b's AUC is null with a reason."""
    store = RunStore(path)
    store.start_run(RUN, "frankenstein", {"train": {"rounds": 2}}, sites)
    for server_round in (1, 2):
        per_site, pooled = stored_round(server_round)
        per_site = {new: per_site[old] for old, new in zip(SITES, sites)}
        store.record_training(RUN, server_round, {
            s: {"train_loss": (0.5 + 0.1 * i) / server_round, "n_labelled": 40, "n_unlabelled": 90,
                "label_counts": {"0": 20, "1": 20}} for i, s in enumerate(sites)})
        store.record_evaluation(RUN, server_round, per_site, pooled)
        store.record_bias(RUN, server_round, VERDICT)
    store.record_note(RUN, 1, sites[2], "skipped_file", "2 files unreadable: truncated pixel data")
    store.finish_run(RUN)
    return store
