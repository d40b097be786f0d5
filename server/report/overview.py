"""The report's first and last sections: the run's facts with the bias verdict
(templates/summary.html), and the notes (templates/notes.html): skipped files, rejected
updates, metrics that could not be computed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup

from fedir.server.report.render import render
from fedir.server.runstore import verdict_changes, verdict_is_final
from fedir.server.summary import key_numbers, score_text

_NOTE_KINDS = {"null_metric": "metric not computed", "rejected": "update rejected"}


def summary_section(summary: dict, history: list[dict]) -> Markup:
    """The run's facts (the selected round and how it was chosen among them), then the
    verdict of the selected round: red with its reasons when the alarm is raised, green
    when it is not, plain with its reason when no verdict could be computed (alarm null);
    every test's key numbers either way. The verdict is labelled final once the study has
    ended and provisional while it runs; ``history`` (RunStore.verdict_history) is every
    round's verdict, each provisional, listed with how often it changed."""
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    facts = [
        ("scenario", summary["scenario"]), ("status", summary["status"]),
        ("started", summary["started_at"]), ("finished", summary["finished_at"] or "-"),
        ("rounds", summary["rounds"]), ("selected round", summary["evaluated_round"]),
        ("sites", len(summary["sites"])), ("report generated", generated),
    ]
    selection = summary["selection"]
    facts.append(("selected by", selection["criterion"] + score_text(selection)))
    if selection["stopped_early"]:
        facts.append(("early stop", selection["stop_reason"]))
    privacy = summary.get("privacy") or {}
    if privacy.get("mode", "off") != "off":
        epsilon = privacy["epsilon"]
        spent = f"{epsilon:.3f}" if epsilon is not None else (
            "infinite (no noise)" if privacy["accountant"].startswith("dp-accounting") else "not accounted")
        facts.append(("privacy", f"{privacy['mode']}: epsilon {spent} at delta {privacy['delta']:g} "
                                 f"after {privacy['rounds_accounted']} round(s)"))
        if privacy.get("stopped"):
            facts.append(("privacy budget", privacy["stopped"]))
    bias = summary["bias"]
    return render(
        "summary.html",
        run_id=summary["run_id"],
        selected_round=summary["evaluated_round"],
        facts=[(name, str(value)) for name, value in facts],
        alarm=bool(bias.get("alarm")),
        computed=bias.get("alarm") is not None,
        reasons=[str(r) for r in bias.get("reasons") or []],
        numbers=[(name.replace("_", " "), text) for name, text in key_numbers(bias).items() if text],
        final=verdict_is_final(summary["status"]),
        history=[(entry["round"], {True: "ALARM", False: "no alarm", None: "not computed"}[entry["alarm"]],
                  ", ".join(entry["signals"]) or "-") for entry in history],
        changes=verdict_changes(history),
    )


def notes_section(notes: list[dict]) -> Markup:
    """One row per note: round, site, kind and message ("-" where a note has none)."""
    rows = []
    for note in notes:
        message = note["message"] if not note.get("metric") else f"{note['metric']}: {note['message']}"
        rows.append(["-" if note["round"] is None else str(note["round"]), note["site"] or "-",
                     _NOTE_KINDS.get(note["kind"], note["kind"]), str(message)])
    return render("notes.html", notes=rows)
