"""What the dashboard shows, as JSON, read from run stores in one consistent snapshot each.

Two views: ``overview`` lists every run under the dashboard's folder (a run folder, or a
parent folder of run folders, each ``runs.sqlite`` possibly holding several runs) with
their pooled AUC by round (per patient where there is one), so runs can be compared; ``run_detail`` is one run: progress,
which sites answered this round, the per-site table of the last evaluated round (built by
``summary.build_summary``, so it is exactly what ``summary.json`` says), metric series
with CIs for the plots, the bias verdict (final once the study has ended, else
provisional) with every round's provisional verdict, notes and site data cards.

The per-site table is formatted here exactly as the terminal table formats it
(``summary.fmt_with_ci``), so the page and summary.json cannot disagree about a number.

What a run shows depends on its task (``task.kind``, ``task.classes``) and is read from one
table of ``KindView`` entries (``CLASSIFICATION``, ``MULTICLASS``, ``SURVIVAL``,
``SEGMENTATION``; ``view_of`` picks one): the table's columns (``[key, heading]``), the
plotted metrics, the run-store metrics behind the plots, the metric of the overview line
(``metric`` and ``metric_name`` say what ``global_auc`` and ``auc_series`` hold), the pooled
row's note. Binary classification is the default entry; its ``columns`` and ``metrics`` are
None, meaning the page's own grouped classification head and plots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedir.metrics import SCALAR_METRICS
from fedir.server.runreader import ReadOnlyRunStore, StoreUnreadable, find_stores
from fedir.server.runstore import GLOBAL_SITE, verdict_changes, verdict_is_final
from fedir.server.summary import (
    SEG_POOLED_LINE,
    binning_line,
    build_summary,
    fmt_value,
    fmt_with_ci,
    key_numbers,
    threshold_line,
)
from fedir.tasks.multiclass_metrics import MULTICLASS_SCALARS
from fedir.tasks.segmentation_metrics import FOREGROUND_NAMES, SEG_SCALARS
from fedir.tasks.survival_metrics import SURVIVAL_SCALARS

# Note kinds that mean a site's update or reply did not count this round.
MISSING_KINDS = ("missing",)
REJECTED_MARK = "reject"
MAX_NOTES = 300  # the page lists the latest notes; a 1,000-site run can have many


@dataclass(frozen=True)
class KindView:
    """What the page shows of a run of one task kind.

    Args:
        columns: the per-site table's ``(key, heading)`` pairs, in order (the site column
            first is the page's); None: the page's own classification head.
        metrics: plotted ``{series key: name}``, the first chosen; None: the page's own.
        scalars: the run-store metric names behind the series (``RunStore.series``).
        per_patient: the series also per patient (``patient_<metric>``, from the sites'
            ``per_patient`` vectors), and the overview line prefers them.
        overview: the run-store metric of the overview line; ``name`` as the page says it.
        table: summary.json -> the table rows (formatted strings, n/a reasons in ``reasons``).
        binning: summary.json's pooled entry -> how the pooled row was rebuilt from aggregates.
        threshold: a decision rule to state (classification: the threshold, or argmax).
        unbounded: plotted metrics not on a 0..1 scale (their y axis is not fixed to it).
    """

    columns: tuple[tuple[str, str], ...] | None
    metrics: dict[str, str] | None
    scalars: tuple[str, ...]
    per_patient: bool
    overview: str
    name: str
    table: Callable[[dict], list[dict[str, Any]]]
    binning: Callable[[dict], str]
    threshold: bool
    unbounded: tuple[str, ...] = ()


def source_name(folder: Path, store: Path) -> str:
    """How the page names a run store: its folder relative to the dashboard's folder."""
    rel = store.parent.resolve().relative_to(folder.resolve())
    return "." if str(rel) == "." else rel.as_posix()


def overview(folder: Path) -> dict[str, Any]:
    """Every run under ``folder``, newest last, with a pooled-AUC series each for comparison."""
    stores = find_stores(folder)
    if not stores:
        return {"folder": str(folder), "error": f"no runs.sqlite in {folder} nor in any folder directly"
                " inside it: the run has not started yet, or this is not a run folder", "runs": []}
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    for path in stores:
        source = source_name(folder, path)
        try:
            store = ReadOnlyRunStore(path)
        except StoreUnreadable as exc:
            errors.append(str(exc))
            continue
        try:
            with store.snapshot():
                runs.extend(_run_line(store, source, run_id) for run_id in store.run_ids())
        except StoreUnreadable as exc:
            errors.append(str(exc))
        finally:
            store.close()
    error = "; ".join(errors) or None
    if not runs and error is None:
        error = (f"the run stores under {folder} hold no run yet" if len(stores) > 1
                 else f"the run store under {folder} holds no run yet")
    return {"folder": str(folder), "error": error, "runs": runs}


def _run_line(store: ReadOnlyRunStore, source: str, run_id: str) -> dict[str, Any]:
    run = store.run(run_id)
    view = view_of(run["config"].get("task.kind", "classification"), int(run["config"].get("task.classes", 2)))
    metric = view.overview
    # per patient where the sites sent per-patient metrics (the primary level), else per image
    patient = store.patient_series(run_id, (metric,))[f"patient_{metric}"] if view.per_patient else {}
    series = patient.get(GLOBAL_SITE) or store.series(run_id, (metric,)).get(metric, {}).get(GLOBAL_SITE, [])
    bias = store.bias(run_id)
    return {
        "source": source, "run_id": run_id, "scenario": run["scenario"], "status": run["status"],
        "started_at": run["started_at"], "finished_at": run["finished_at"],
        "rounds_done": store.last_round(run_id, split="test") or 0,
        "rounds_planned": _planned_rounds(run["config"]), "n_sites": len(run["sites"]),
        "global_auc": series[-1][1] if series else None,
        "alarm": None if bias is None else bool(bias.get("alarm")),
        "verdict_final": bias is not None and verdict_is_final(run["status"]),
        "auc_series": series, "metric": metric, "metric_name": view.name,
    }


def run_detail(folder: Path, source: str, run_id: str, since: str | None = None) -> dict[str, Any]:
    """One run's page content, or ``{"unchanged": True}`` if its fingerprint is still ``since``."""
    path = _store_path(folder, source)
    store = ReadOnlyRunStore(path)
    try:
        with store.snapshot():
            if run_id not in store.run_ids():
                raise StoreUnreadable(f"no run {run_id!r} in {path}")
            fingerprint = store.fingerprint(run_id)
            if since is not None and since == fingerprint:
                return {"unchanged": True, "fingerprint": fingerprint}
            return {"fingerprint": fingerprint, **_detail(store, run_id)}
    finally:
        store.close()


def _store_path(folder: Path, source: str) -> Path:
    """The store a page asked for, only among those the folder holds (no path from the URL is trusted)."""
    for path in find_stores(folder):
        if source_name(folder, path) == source:
            return path
    raise StoreUnreadable(f"no run store {source!r} under {folder}")


def _detail(store: ReadOnlyRunStore, run_id: str) -> dict[str, Any]:
    summary = build_summary(store, run_id)
    run = store.run(run_id)
    notes = store.notes(run_id)
    bias = summary["bias"]
    history = store.verdict_history(run_id)
    verdict_round = _verdict_round(store, run_id, summary["selection"]["round"])
    view = view_of(summary.get("task", "classification"), int(summary.get("classes", 2)))
    return {
        "run": {
            "run_id": run_id, "scenario": run["scenario"], "status": run["status"],
            "started_at": run["started_at"], "finished_at": run["finished_at"],
            "sites": summary["sites"], "rounds_planned": _planned_rounds(run["config"]),
            "rounds_evaluated": store.last_round(run_id, split="test") or 0,
            "selection": summary["selection"],
        },
        "round": _round_status(store, run_id, summary["sites"], notes),
        "table": view.table(summary),
        # None: the page's classification columns and metrics
        "columns": None if view.columns is None else [list(c) for c in view.columns],
        "metrics": view.metrics,
        "unbounded": list(view.unbounded),
        "verdict": {
            "alarm": bool(bias.get("alarm")), "reasons": list(bias.get("reasons") or []),
            # secondary signals that fired without raising the alarm (bias.secondary-to-alarm)
            "warnings": list(bias.get("warnings") or []),
            "numbers": {name.replace("_", " "): text for name, text in key_numbers(bias).items() if text},
            "round": verdict_round,
            # the study's verdict once it has ended; before, the latest round's, provisional
            "final": verdict_round is not None and verdict_is_final(run["status"]),
            "alarm_rounds": store.alarm_rounds(run_id),
            "history": [[entry["round"], entry["alarm"]] for entry in history],
            "changes": verdict_changes(history),
        },
        "series": {**(store.patient_series(run_id, view.scalars) if view.per_patient else {}),
                   **store.series(run_id, view.scalars)},
        "threshold": threshold_line(summary.get("threshold")) if view.threshold else "",
        "binning": view.binning(summary["global"]),
        "notes": {"total": len(notes), "latest": [_note(n) for n in notes[-MAX_NOTES:]]},
        "cards": {site: _flatten(card) for site, card in store.data_cards(run_id).items()},
        "privacy": summary["privacy"],
    }


def _verdict_round(store: ReadOnlyRunStore, run_id: str, selected: int | None) -> int | None:
    """The round of the verdict summary.json shows: the selected round's once it has one,
    else the latest (a round's verdict lags its evaluation by one transaction)."""
    if selected is not None and store.bias(run_id, selected) is not None:
        return selected
    return store.last_verdict_round(run_id)


def _planned_rounds(config: dict) -> int | None:
    value = config.get("train.rounds")
    return value if isinstance(value, int) else None


def _round_status(store: ReadOnlyRunStore, run_id: str, sites: list[str], notes: list[dict]) -> dict[str, Any]:
    """The latest round: which stage it reached, who answered, who is missing, who was rejected."""
    current = store.last_round(run_id)
    if current is None:
        return {"round": None, "stage": "waiting for the first round", "answered": [], "missing": sites,
                "failed": [], "rejected": []}
    evaluated = store.last_round(run_id, split="test") == current
    split = "test" if evaluated else "train"
    answered = sorted(s for s in store.site_metrics(run_id, current, split) if s != GLOBAL_SITE)
    this_round = [n for n in notes if n["round"] == current]
    return {
        "round": current,
        "stage": "evaluated" if evaluated else "trained, evaluation pending",
        "answered": answered,
        "missing": [s for s in sites if s not in answered],
        "failed": [_note(n) for n in this_round if n["kind"] in MISSING_KINDS],
        "rejected": [_note(n) for n in this_round if REJECTED_MARK in n["kind"]],
    }


def _table(summary: dict, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The per-site rows then the pooled row, formatted as the terminal table formats them:
    per patient first (``patient_*``, the primary metrics, and the per-patient ECE), the
    per-image metrics beside; ``metrics``: the kind's (binary: SCALAR_METRICS; K > 2 classes:
    MULTICLASS_SCALARS, ``auc`` the macro one-vs-rest AUC). A per-patient cell that is n/a has
    its reason under the same ``patient_*`` key of ``reasons``."""
    rows = []
    for site, entry in [*summary["per_site"].items(), (GLOBAL_SITE, summary["global"])]:
        patient = entry.get("per_patient") or {}
        reasons = dict(entry["reasons"])
        row: dict[str, Any] = {
            "site": site, "n_test": str(entry.get("n_test", 0)),
            "positives": "n/a" if entry.get("positives") is None else str(entry["positives"]),
            "patients": "n/a" if not patient else str(patient.get("n_test", 0)),
            "patient_positives": "n/a" if patient.get("positives") is None else str(patient["positives"]),
            "ece": fmt_value(patient.get("ece")),
        }
        for metric in metrics:
            row[metric] = fmt_with_ci(entry.get(metric), entry.get(metric + "_ci"))
            row[f"patient_{metric}"] = fmt_with_ci(patient.get(metric), patient.get(metric + "_ci"))
            why = (patient.get("reasons") or {}).get(metric) if patient else reasons.get("per_patient")
            if why:
                reasons[f"patient_{metric}"] = why
        row["reasons"] = reasons
        rows.append(row)
    return rows


def _flat_table(summary: dict, counts: tuple[tuple[str, str], ...], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The per-site rows then the pooled row of a kind with one level (survival, segmentation:
    server/summary's survival_entry, segmentation_entry): ``counts`` as ``(row key, entry
    key)`` pairs, then each metric with its CI; an n/a cell has its reason under its key of
    ``reasons`` (e.g. the pooled Uno's C, not computed from aggregates)."""
    rows = []
    for site, entry in [*summary["per_site"].items(), (GLOBAL_SITE, summary["global"])]:
        row: dict[str, Any] = {"site": site, "n_test": str(entry.get("n_test") or 0),
                               "reasons": dict(entry.get("reasons") or {})}
        for key, name in counts:
            row[key] = "n/a" if entry.get(name) is None else str(int(entry[name]))
        for metric in metrics:
            row[metric] = fmt_with_ci(entry.get(metric), entry.get(metric + "_ci"))
        rows.append(row)
    return rows


def _c_binning_line(pooled: dict) -> str:
    """The bound of the pooled C-index from binned counts, and the site-stratified C."""
    bound, stratified = pooled.get("c_index_binning_error"), pooled.get("stratified_c_index")
    if bound is None:
        return ""
    return (f"Pooled C-index from the sites' binned counts: within-site pairs exact, binning error at most +-{bound:.3f}"
            + ("" if stratified is None else f"; site-stratified C-index {stratified:.3f}") + ".")


def _auc_binning_line(pooled: dict) -> str:
    return " ".join(binning_line(pooled))


# The per-kind views (view_of picks one). Keys as server/summary's entries name them (the
# per-patient ones of _table as ``patient_<metric>``), series as the run store records them.
CLASSIFICATION = KindView(
    columns=None, metrics=None, scalars=SCALAR_METRICS, per_patient=True, overview="auc", name="AUC",
    table=lambda summary: _table(summary, SCALAR_METRICS), binning=_auc_binning_line, threshold=True)
MULTICLASS = KindView(
    columns=(("patients", "patients"), ("patient_auc", "macro AUC per patient [95% CI]"),
             ("patient_balanced_accuracy", "balanced accuracy per patient [95% CI]"),
             ("patient_accuracy", "accuracy per patient [95% CI]"), ("n_test", "n test"),
             ("auc", "macro AUC per image [95% CI]"), ("balanced_accuracy", "balanced accuracy per image [95% CI]"),
             ("accuracy", "accuracy per image [95% CI]")),
    metrics={"patient_auc": "macro AUC per patient", "patient_balanced_accuracy": "balanced accuracy per patient",
             "patient_accuracy": "accuracy per patient", "auc": "macro AUC per image",
             "balanced_accuracy": "balanced accuracy per image", "accuracy": "accuracy per image"},
    scalars=MULTICLASS_SCALARS, per_patient=True, overview="auc", name="macro AUC",
    table=lambda summary: _table(summary, MULTICLASS_SCALARS), binning=_auc_binning_line, threshold=True)
SURVIVAL = KindView(
    columns=(("n_test", "n test"), ("patients", "patients"), ("events", "events"),
             ("c_index", "C-index [95% CI]"), ("uno_c_index", "Uno's C [95% CI]")),
    metrics={"c_index": "Harrell's C-index per patient", "uno_c_index": "Uno's C-index per patient"},
    scalars=SURVIVAL_SCALARS, per_patient=False, overview="c_index", name="C-index",  # one row per patient already
    table=lambda summary: _flat_table(summary, (("patients", "n_patients"), ("events", "events")),
                                      ("c_index", "uno_c_index")),
    binning=_c_binning_line, threshold=False)
SEGMENTATION = KindView(
    columns=(("patients", "patients"), ("n_test", "images"), ("dice", "Dice [95% CI]"), ("hd95", "HD95 px [95% CI]"),
             *((f"dice_{name}", f"{name} Dice [95% CI]") for name in FOREGROUND_NAMES)),
    metrics={"dice": "Dice per patient", "hd95": "HD95 (px) per patient",
             **{f"dice_{name}": f"{name} Dice per patient" for name in FOREGROUND_NAMES}},
    scalars=SEG_SCALARS, per_patient=False, overview="dice", name="Dice",  # per patient already
    table=lambda summary: _flat_table(summary, (("patients", "n_patients"),), SEG_SCALARS),
    binning=lambda pooled: SEG_POOLED_LINE, threshold=False, unbounded=("hd95",))


def view_of(kind: str, classes: int) -> KindView:
    """The view of a run of ``task.kind`` = ``kind`` with ``task.classes`` = ``classes``."""
    if kind == "segmentation":
        return SEGMENTATION
    if kind == "survival":
        return SURVIVAL
    return MULTICLASS if classes > 2 else CLASSIFICATION


def _note(note: dict) -> dict[str, Any]:
    message = note["message"] if not note.get("metric") else f"{note['metric']}: {note['message']}"
    return {"round": note["round"], "site": note["site"], "kind": note["kind"], "message": message}


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a / b": "1"}``: a card's nesting depth is the sender's business."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix} / {key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        return {prefix: ", ".join(str(v) for v in value)}
    return {prefix: "n/a" if value is None else str(value)}
