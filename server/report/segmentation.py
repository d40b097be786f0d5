"""The report's segmentation section (task.kind = segmentation): the Dice by round per site
with CI bands, the selected round's per-site table (Dice and HD95 with patient-bootstrap
CIs, the pooled row from the sites' sums; templates/segmentation.html) and example overlays
of synthetic test frames. It replaces the classification sections (AUC tables, calibration,
score histograms), which a label map does not have.

No pixel of a site's image reaches the server: a site sends none. The overlays are drawn by
the simulation harness (fedir.simulations.overlays), only on a federation that
`fedir data synth` wrote, into the run folder (OVERLAY_DIR: PNG files and OVERLAY_INDEX);
this module only embeds those files when their index names this run, and otherwise says
in one line why there are none.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from markupsafe import Markup

from fedir.server.report import figures
from fedir.server.report.render import render
from fedir.server.report.sites import _cell, _count, _series, metric_cell, table_entries

_METRICS = (("dice", "Dice [95% CI]"), ("hd95", "HD95, pixels [95% CI]"))
OVERLAY_DIR = "overlays"  # in the run folder: the harness's PNG files and their index
OVERLAY_INDEX = "index.json"  # {"run_id", "model", "overlays": [{site, patient, test_index, dice, hd95, file}], "reason"}
NO_PIXELS = ("No example overlays: a real site sends no pixels. They are drawn only by a simulation on a "
             "synthetic federation (fedir data synth), from its test frames.")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def segmentation_section(rows: list[dict], summary: dict, run_dir: Path | None = None) -> Markup:
    """The segmentation study's per-site results (see the module docstring); `run_dir` is
    the run folder whose OVERLAY_DIR holds the harness's overlays, if any."""
    footnotes: list[str] = []
    table = []
    for site, entry, css in table_entries(summary):
        cells = [_cell(_count(entry.get("n_patients"))), _cell(_count(entry.get("n_test")))]
        cells += [metric_cell(entry, metric, f"{site},", footnotes) for metric, _ in _METRICS]
        table.append({"site": site, "css": css, "cells": cells})
    series = _series(rows, "test", "dice")
    overlays, overlay_reason = example_overlays(run_dir, summary.get("run_id"))
    return render(
        "segmentation.html",
        dice_png=figures.auc_by_round(series, summary["sites"], ylabel="Dice (test patients)") if series else None,
        evaluated_round=summary["evaluated_round"],
        header=["patients", "masked images", *(name for _, name in _METRICS)],
        rows=table,
        footnotes=footnotes,
        overlays=overlays,
        overlay_reason=overlay_reason,
    )


def example_overlays(run_dir: Path | None, run_id: str | None) -> tuple[list[dict], str]:
    """(figures, reason): the overlays of OVERLAY_INDEX in `run_dir` written for `run_id`,
    each as {"png": base64 text, "caption": text}, and the line shown when there are none.

    An index of another run (a folder reused), a file it names outside OVERLAY_DIR or that
    is not a PNG is not shown; without an index the reason is NO_PIXELS.
    """
    folder = None if run_dir is None else Path(run_dir) / OVERLAY_DIR
    if folder is None or not (folder / OVERLAY_INDEX).is_file():
        return [], NO_PIXELS
    try:
        index = json.loads((folder / OVERLAY_INDEX).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [], f"No example overlays: their index {OVERLAY_DIR}/{OVERLAY_INDEX} cannot be read ({exc})."
    if not isinstance(index, dict) or index.get("run_id") != run_id:
        return [], NO_PIXELS
    shown = []
    for entry in index.get("overlays") or []:
        name = str(entry.get("file", ""))
        path = folder / name
        if Path(name).name != name or not name.endswith(".png") or not path.is_file():
            continue
        data = path.read_bytes()
        if not data.startswith(_PNG_MAGIC):
            continue
        shown.append({"png": base64.b64encode(data).decode("ascii"), "caption": _caption(entry)})
    if shown:
        return shown, ""
    return [], str(index.get("reason") or "No example overlays were drawn for this run.")


def _caption(entry: dict) -> str:
    dice = entry.get("dice")
    hd95 = entry.get("hd95")
    return (f"{entry.get('site')}, test patient {entry.get('patient')}, masked test image {entry.get('test_index')}: "
            f"Dice {'n/a' if dice is None else f'{dice:.3f}'}"
            + ("" if hd95 is None else f", HD95 {hd95:.1f} px"))
