"""The report's "Data cards" section: each site's shared data card, side by side
(templates/cards.html).

Only what the sites sent is shown: k-suppressed counts (fedir.client.datacard). A
suppressed cell is never shown as a number, only as how many cells were withheld, so the
reader knows that the table is incomplete and why.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from fedir.server.report.render import render

_SUMMARY_ROWS = (
    ("files listed", lambda c: c["files"]["listed"]),
    ("files loaded", lambda c: c["files"]["loaded"]),
    ("files skipped", lambda c: "; ".join(f"{r}: {n}" for r, n in c["files"]["skipped"].items()) or 0),
    ("patients train / val / test", lambda c: " / ".join(str(v) for v in c["patients"].values())),
    ("labelled / unlabelled patients",
     lambda c: f'{c["labels"]["labelled_patients"]} / {c["labels"]["unlabelled_patients"]}'),
    ("prevalence (class 1)", lambda c: c["labels"]["prevalence"]),
    ("masks: files / frames / patients",
     lambda c: "n/a" if "masks" not in c else
     f'{c["masks"]["runs_with_masks"]} / {c["masks"]["frames_with_masks"]} / {c["masks"]["patients_with_masks"]}'),
    ("masks skipped", lambda c: "n/a" if "masks" not in c else
     "; ".join(f"{r}: {n}" for r, n in c["masks"]["skipped"].items()) or 0),
    ("all-background mask frames", lambda c: c.get("masks", {}).get("all_background_frames")),
)


def card_section(cards: dict[str, dict[str, Any]]) -> Markup:
    """The data cards of a run (site -> card); a short line when none arrived.

    A row's cell is text, or a suppressed table ({"values": [(value, patients)...],
    "suppressed": cells withheld}) that the template writes one value per line."""
    rows: list[tuple[str, list[Any]]] = [
        (label, [_text(getter(card)) for card in cards.values()]) for label, getter in _SUMMARY_ROWS
    ]
    rows.append(("labelled patients per class", [_table(card["labels"]["per_class"]) for card in cards.values()]))
    rows.append(("mask foreground fraction (patients)",
                 [_table(card.get("masks", {}).get("foreground_fraction")) for card in cards.values()]))
    fields = sorted({name for card in cards.values() for name in card.get("acquisition", {})})
    rows += [(name, [_table(card.get("acquisition", {}).get(name)) for card in cards.values()]) for name in fields]
    k = ", ".join(sorted({str(card.get("k")) for card in cards.values()}))
    return render("cards.html", sites=list(cards), rows=rows if cards else [], k=k)


def _table(table: dict[str, Any] | None) -> dict[str, Any]:
    if not table:
        return {"values": [], "suppressed": 0}
    return {"values": [(str(value), int(count)) for value, count in table["values"].items()],
            "suppressed": int(table.get("suppressed_cells") or 0)}


def _text(value: Any) -> str:
    return "n/a" if value is None else str(value)
