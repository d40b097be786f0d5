"""The report's "Data cards" section: each site's shared data card, side by side.

Only what the sites sent is shown: k-suppressed counts (fedir.client.datacard). A
suppressed cell is never shown as a number, only as how many cells were withheld, so the
reader knows that the table is incomplete and why.
"""

from __future__ import annotations

from html import escape
from typing import Any


def card_section(cards: dict[str, dict[str, Any]]) -> str:
    """HTML for the data cards of a run (site -> card); a short line when none arrived."""
    if not cards:
        return '<h2>Data cards</h2><p class="muted">No site sent a data card.</p>'
    sites = list(cards)
    head = "".join(f"<th>{escape(site)}</th>" for site in sites)
    rows = [_row(label, [_fmt(getter(card)) for card in cards.values()])
            for label, getter in _SUMMARY_ROWS]
    # _table returns HTML (escaped values, line breaks), so it must not pass through _fmt
    rows.append(_row("labelled patients per class",
                     [_table(card["labels"]["per_class"]) for card in cards.values()]))
    fields = sorted({name for card in cards.values() for name in card.get("acquisition", {})})
    rows += [_row(name, [_table(card.get("acquisition", {}).get(name)) for card in cards.values()])
             for name in fields]
    k = sorted({str(card.get("k")) for card in cards.values()})
    caption = (f"What each site shares about its data, computed at the site: counts only, "
               f"acquisition metadata as patients per value, cells below k = {', '.join(k)} "
               "patients suppressed. No name, identifier, UID, date, free text or pixel.")
    return (f'<h2>Data cards</h2><table><tr><th class="name">&nbsp;</th>{head}</tr>'
            f'{"".join(rows)}</table><p class="footnotes">{escape(caption)}</p>')


_SUMMARY_ROWS = (
    ("files listed", lambda c: c["files"]["listed"]),
    ("files loaded", lambda c: c["files"]["loaded"]),
    ("files skipped", lambda c: "; ".join(f"{r}: {n}" for r, n in c["files"]["skipped"].items()) or 0),
    ("patients train / val / test", lambda c: " / ".join(str(v) for v in c["patients"].values())),
    ("labelled / unlabelled patients",
     lambda c: f'{c["labels"]["labelled_patients"]} / {c["labels"]["unlabelled_patients"]}'),
    ("prevalence (class 1)", lambda c: c["labels"]["prevalence"]),
)


def _row(label: str, cells: list[str]) -> str:
    tds = "".join(f'<td class="name">{cell}</td>' for cell in cells)
    return f'<tr><td class="name">{escape(label)}</td>{tds}</tr>'


def _table(table: dict[str, Any] | None) -> str:
    """A suppressed table as escaped text: 'value: n' per cell, then the withheld count."""
    if not table:
        return "-"
    parts = [f"{escape(str(value))}: {int(count)}" for value, count in table["values"].items()]
    if table.get("suppressed_cells"):
        parts.append(f'<span class="muted">{int(table["suppressed_cells"])} cell(s) below k</span>')
    return "<br>".join(parts) or "-"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else escape(str(value))
