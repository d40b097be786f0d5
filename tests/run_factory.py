"""Fabricated runs written straight into runs.sqlite, round by round, as the ServerApp writes them.

The dashboard and export tests need runs of any size (4 sites or 100, finished or still
being written) in seconds; training a model for that would take minutes. Each round is
written in the order ``StudyRecorder`` writes it: training aggregates, notes, evaluation
(every site and the pooled entry in one transaction), then the bias verdict.
"""

from __future__ import annotations

import random

from fedir.server.runstore import RunStore

ALARM_REASON = ("pooled AUC 0.91 exceeds the mean within-site AUC 0.74 by 0.17 (> 0.05): "
                "the model separates sites")


def site_eval(rng: random.Random, auc: float | None, n: int = 60) -> dict:
    """One site's evaluation aggregates (the shape fedir.metrics.site_metrics returns)."""
    positives = n // 3 if auc is not None else 0
    half = 0.04 + 0.06 * rng.random()
    entry = {"n": n, "n_patients": n // 2, "positives": positives, "reasons": {},
             "tp": positives // 2, "fn": positives - positives // 2, "tn": (n - positives) // 2,
             "fp": n - positives - (n - positives) // 2,
             "hist_neg": [rng.randint(0, 9) for _ in range(20)], "hist_pos": [rng.randint(0, 9) for _ in range(20)]}
    values = {"auc": auc, "accuracy": 0.6 + 0.3 * rng.random(), "sensitivity": 0.5 + 0.4 * rng.random(),
              "specificity": 0.55 + 0.4 * rng.random()}
    for name, value in values.items():
        entry[name] = value
        entry[name + "_ci"] = None if value is None else [max(0.0, value - half), min(1.0, value + half)]
    if auc is None:
        entry["reasons"] = {"auc": "only one class among the test patients"}
    return entry


def verdict(alarm: bool, gap: float) -> dict:
    tests = {
        "site_label_association": {"alarm": False, "p_value": 0.41, "cramers_v": 0.07,
                                   "reason": "label prevalence is similar across sites"},
        "pooled_vs_within_auc": {"alarm": alarm, "pooled_auc": 0.74 + gap, "within_auc": 0.74, "gap": gap,
                                 "reason": ALARM_REASON if alarm else "pooled AUC close to the within-site AUC"},
    }
    return {"alarm": alarm, "reasons": [ALARM_REASON] if alarm else [], "tests": tests}


def start(store: RunStore, run_id: str, sites: list[str], rounds: int, scenario: str = "fabricated") -> None:
    store.start_run(run_id, scenario, {"train.rounds": rounds}, sites)


def write_round(store: RunStore, run_id: str, sites: list[str], server_round: int, *, seed: int = 0,
                alarm_from: int | None = None, missing: tuple[str, ...] = (), rejected: tuple[str, ...] = (),
                null_auc: tuple[str, ...] = (), cards: bool = False) -> None:
    """One complete round. ``missing`` sites send nothing; ``rejected`` sites train but their update is refused."""
    rng = random.Random(f"{seed}-{server_round}")
    answering = [s for s in sites if s not in missing]
    training = {}
    for site in answering:
        training[site] = {"train_loss": 0.7 / server_round + 0.1 * rng.random(), "n_labelled": 40,
                          "n_unlabelled": 90, "label_counts": {"0": 20, "1": 20}}
        if cards and server_round == 1:
            store.record_card(run_id, site, {"images": 130, "patients": 65, "Modality": {"XA": 130},
                                             "Manufacturer": {"Siemens" if sites.index(site) % 2 else "Philips": 130}})
    store.record_training(run_id, server_round, training)
    for site in missing:
        store.record_note(run_id, server_round, site, "missing", "train failed: node did not reply in time")
    for site in rejected:
        store.record_note(run_id, server_round, site, "rejected", "update norm 1000x the round's median")
    per_site = {}
    for i, site in enumerate(answering):
        auc = None if site in null_auc else min(0.97, 0.55 + 0.04 * server_round + 0.03 * (i % 5) + 0.02 * rng.random())
        per_site[site] = site_eval(rng, auc, n=40 + 10 * (i % 4))
    pooled = site_eval(rng, min(0.98, 0.6 + 0.05 * server_round + 0.03 * (seed % 3)), n=sum(e["n"] for e in per_site.values()))
    store.record_evaluation(run_id, server_round, per_site, pooled)
    alarm = alarm_from is not None and server_round >= alarm_from
    store.record_bias(run_id, server_round, verdict(alarm, 0.17 if alarm else 0.01))


def write_run(store: RunStore, run_id: str, sites: list[str], rounds: int, *, finish: bool = True,
              **round_options: object) -> None:
    """A whole run: ``rounds`` rounds, then finished unless ``finish`` is False."""
    start(store, run_id, sites, rounds)
    for server_round in range(1, rounds + 1):
        write_round(store, run_id, sites, server_round, **round_options)
    if finish:
        store.finish_run(run_id)
