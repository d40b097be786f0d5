"""The report's study-design sections: where the first model came from (templates/model_init.html),
a pretraining study's contrastive metrics (templates/pretraining.html), and the checklist of
common errors with each item's status for this run
(templates/checklist.html, fedir.server.checklist)."""

from __future__ import annotations

from markupsafe import Markup

from fedir.server.checklist import ATTENTION, OK
from fedir.server.report.render import render

_CSS = {OK: "no", ATTENTION: "yes"}  # the report's green and red


def checklist_section(checklist: list[dict]) -> Markup:
    """One row per item: the item, its status (coloured when ok or attention), the detail."""
    rows = [{**row, "css": _CSS.get(row["status"], "muted")} for row in checklist]
    return render("checklist.html", rows=rows)


def model_init_section(entry: dict) -> Markup:
    """Random init, or the checkpoint with its loaded, new and dropped keys; and whether the
    sites froze the encoder for the first rounds (train.freeze)."""
    freeze = ("Every layer trains from round 1 (train.freeze = none)." if entry["freeze"] == "none" else
              f"The sites trained the final classifier layer only in rounds 1-{entry['freeze_rounds']} (encoder "
              "frozen with its BatchNorm statistics, train.freeze = encoder), every layer afterwards.")
    if entry["from"] != "checkpoint":
        return render("model_init.html", checkpoint=False, seed=entry["seed"], freeze=freeze)
    shown = entry["shown_at_most"]
    return render(
        "model_init.html", checkpoint=True, path=entry["path"], sha256=entry["sha256"],
        prefix=entry["prefix_stripped"], n_loaded=entry["n_loaded"], n_new=entry["n_new"],
        n_dropped=entry["n_dropped"], share=f"{entry['loaded_share']:.1%}", minimum=f"{entry['min_loaded_share']:.0%}",
        loaded=entry["loaded"], new=entry["new"], dropped=entry["dropped"], shown=shown,
        truncated=max(entry["n_loaded"], entry["n_new"], entry["n_dropped"]) > shown, freeze=freeze,
    )


def pretraining_section(entry: dict | None) -> Markup:
    """A simclr study's per-site and pooled contrastive metrics (summary.json `pretraining`);
    nothing for any other study."""
    if entry is None:
        return Markup("")

    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    sites = [*entry["per_site"].items(), ("pooled", entry["global"])]
    rows = [{"site": site, "split": split, "n_images": splits[split]["n_images"],
             "loss": cell(splits[split]["contrastive_loss"], ".3f"),
             "chance": cell(splits[split]["contrastive_chance"], ".3f"),
             "match": cell(splits[split]["view_match"], ".1%")}
            for site, splits in sites for split in ("val", "test") if split in splits]
    return render("pretraining.html", round=entry["round"], rows=rows)
