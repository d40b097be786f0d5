"""The report's data-card section: escaped, suppressed cells shown only as a count."""

from fedir.server.report.cards import card_section

CARD = {
    "card_version": 1, "k": 5,
    "files": {"listed": 12, "loaded": 11, "skipped": {"truncated": 1}},
    "patients": {"train": 6, "val": 2, "test": 3},
    "images": {"train": 7, "val": 2, "test": 2},
    "labels": {"labelled_patients": 9, "unlabelled_patients": 2,
               "per_class": {"values": {}, "suppressed_cells": 2}, "prevalence": None},
    "acquisition": {"Manufacturer": {"values": {"<Acme & Co>": 9}, "suppressed_cells": 1}},
}


def test_card_section_escapes_and_shows_suppression() -> None:
    html = card_section({"site<1>": CARD})
    assert "site&lt;1&gt;" in html and "<site<1>" not in html
    assert "&lt;Acme &amp; Co&gt;: 9" in html and "1 cell(s) below k" in html
    assert "truncated: 1" in html and "6 / 2 / 3" in html and "n/a" in html


def test_no_cards_says_so() -> None:
    assert "No site sent a data card" in card_section({})


def test_per_class_counts_render_as_lines_not_escaped_markup() -> None:
    card = {**CARD, "labels": {**CARD["labels"], "per_class": {"values": {"0": 20, "1": 14}, "suppressed_cells": 0}}}
    html = card_section({"a": card})
    assert "0: 20<br>1: 14" in html and "&lt;br&gt;" not in html
