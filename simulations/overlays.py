"""Example overlays of a segmentation study's synthetic test frames, for the report.

A real site sends no pixels, so the coordinator's report (fedir.server.report.segmentation)
cannot show what the model segments. A simulation on a federation that `fedir data synth`
wrote holds synthetic images only, and there this module, run by the simulation harness
after model.pt is written (fedir.simulations.simulate and fedir.simulations.inprocess),
draws a few of them: for `report.overlays` test frames per site, the frame as the model saw
it, its reference mask and the selected model's predicted mask, as PNG files with an index
(fedir.server.report.segmentation.OVERLAY_INDEX) in the run folder, then renders the
report again so that it embeds them. On any other federation it draws nothing (the report
says why in one line).

The frames and the model are the ClientApp's own: the site is read by
fedir.client.inputs.view_of (same frame policy, resize and mask alignment as in training and
evaluation), the model is set up by fedir.client.client_app.evaluation_model from model.pt
for the selected round (with what the site keeps, restored from its own disk as a resumed
site does: fedir.client.site_state), and the rows are fedir.client.client_app.scored_rows,
exactly those the site's evaluation scored. Each frame's Dice is
fedir.tasks.segmentation_metrics.per_image_metrics, the per-image Dice the site's metrics
average.

The frames are chosen by a hash of (site, patient, frame index within the patient), never by
their Dice: the first patients in that order, one frame each, then a second frame of each
while more are asked for; frames whose reference mask holds no foreground (no Dice) are
not drawn.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from fedir.client.client_app import evaluation_model, scored_rows
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.server.report import write_report
from fedir.server.report.segmentation import OVERLAY_DIR, OVERLAY_INDEX
from fedir.server.runstore import RunStore
from fedir.simulations.compare import evaluation_content
from fedir.simulations.synthetic import synthetic_record
from fedir.tasks import segmentation
from fedir.tasks.segmentation_metrics import per_image_metrics

# label -> colour of the mask drawn over the frame (fedir.client.masks.MASK_LABELS)
COLOURS = {1: ("vessel", "#1e90ff"), 2: ("stenosis", "#e8262b")}


def site_contexts(settings: Settings) -> dict[int, Context]:
    """One fresh Flower Context per site, as a simulation node gets (its `partition-id`
    names the site); the site's kept state comes back from its own disk."""
    n = len(settings.sites)
    return {100 + i: Context(run_id=0, node_id=100 + i, node_config={"partition-id": i, "num-partitions": n},
                             state=RecordDict(), run_config=settings.to_run_config()) for i in range(n)}


def chosen_frames(site: str, patients: list[str], drawable: np.ndarray, n: int) -> list[int]:
    """Up to `n` indices into a split's rows (`patients` per row; `drawable`: rows with a
    defined Dice), in the order of the module docstring: by a hash, never by a result."""
    position: dict[str, int] = {}
    keyed = []
    for i, patient in enumerate(patients):
        k = position[patient] = position.get(patient, -1) + 1
        if drawable[i]:
            keyed.append((hashlib.sha256(f"{site}\x00{patient}\x00{k}".encode()).hexdigest(), patient, i))
    keyed.sort()
    chosen: list[int] = []
    while keyed and len(chosen) < n:
        seen: set[str] = set()
        for entry in list(keyed):
            if entry[1] not in seen and len(chosen) < n:
                seen.add(entry[1])
                chosen.append(entry[2])
                keyed.remove(entry)
    return chosen


def draw(image: np.ndarray, reference: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """Three panels as a PNG: the (S, S) frame, its reference and its predicted label map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    lo, hi = np.percentile(image, [1, 99])
    colours = ListedColormap([(0, 0, 0, 0), *(COLOURS[label][1] for label in sorted(COLOURS))])
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.4), dpi=100)
    for ax, (title, labels) in zip(axes, (("test frame", None), ("reference mask", reference),
                                          ("predicted mask (model.pt)", predicted))):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        if labels is not None:
            ax.imshow(np.ma.masked_equal(labels, 0), cmap=colours, vmin=0, vmax=len(COLOURS), alpha=0.6,
                      interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.legend(handles=[Patch(color=colour, label=name) for name, colour in COLOURS.values()], loc="lower center",
               ncol=len(COLOURS), fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.04))
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


def write_overlays(settings: Settings, out_dir: Path, summary: dict,
                   contexts: dict[int, Context] | None = None) -> dict[str, Any] | None:
    """Draw the overlays of a finished segmentation run in `out_dir` (module docstring) and
    return their index; None, with nothing written, when the study is not a segmentation or
    the federation is not one `fedir data synth` wrote. `contexts` are the simulation's
    nodes (the in-process grid's); None builds fresh ones (site_contexts)."""
    out_dir = Path(out_dir)
    folder = out_dir / OVERLAY_DIR
    if settings.task_kind != segmentation.NAME:
        return None
    if (folder / OVERLAY_INDEX).is_file():  # a reused run folder's earlier overlays
        shutil.rmtree(folder)
    if synthetic_record(settings.sites) is None or not (out_dir / "model.pt").is_file():
        return None
    index: dict[str, Any] = {"run_id": summary["run_id"], "model": "model.pt",
                             "round": (summary.get("selection") or {}).get("round"), "overlays": [], "reason": None}
    folder.mkdir(parents=True, exist_ok=True)
    if settings.report_overlays == 0:
        index["reason"] = "No example overlays: report.overlays = 0."
    elif settings.spatial_dims != 2:
        index["reason"] = "No example overlays: they are drawn for 2D frames, and data.frame-policy = volume reads volumes."
    else:
        content = evaluation_content(settings, out_dir, summary)
        for context in (contexts or site_contexts(settings)).values():
            index["overlays"] += _site_overlays(settings, content, context, folder)
        if not index["overlays"]:
            index["reason"] = "No example overlays: no site has a masked test frame with foreground."
    (folder / OVERLAY_INDEX).write_text(json.dumps(index, indent=1, allow_nan=False) + "\n")
    return index


def _site_overlays(settings: Settings, content: RecordDict, context: Context, folder: Path) -> list[dict]:
    """One site's overlays: its scored test rows, the chosen frames predicted and drawn."""
    site_settings, site, config, model = evaluation_model(content, context, settings)
    x, target, patients = scored_rows(site_settings, site, config, "test")
    if not len(patients):
        return []
    drawable = np.asarray(target).reshape(len(patients), -1).max(axis=1) > 0
    rows = chosen_frames(site.name, patients, drawable, settings.report_overlays)
    if not rows:
        return []
    predicted = predict(model, x[rows], pick_device(), score=segmentation.score)
    reference = np.asarray(target)[rows, 0]
    dice, hd95 = per_image_metrics(reference, predicted)
    entries = []
    for k, row in enumerate(rows):
        name = f"{site.name}-test-{row}.png"
        draw(x[row, 0].numpy(), reference[k], predicted[k], folder / name)
        entries.append({"site": site.name, "patient": patients[row], "test_index": int(row),
                        "dice": _number(dice[k]), "hd95": _number(hd95[k]), "file": name})
    return entries


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def add_overlays(settings: Settings, out_dir: Path, summary: dict, contexts: dict[int, Context] | None = None) -> None:
    """write_overlays, then report.html rendered again from the run store so that it embeds
    them (nothing to do, and the report as it is, for a study that is not a segmentation)."""
    if settings.task_kind != segmentation.NAME:
        return
    earlier = (Path(out_dir) / OVERLAY_DIR / OVERLAY_INDEX).is_file()
    if write_overlays(settings, out_dir, summary, contexts) is None and not earlier:
        return  # nothing drawn and nothing removed: the report already says why
    with RunStore(Path(out_dir) / "runs.sqlite") as store:
        write_report(store, summary["run_id"], Path(out_dir) / "report.html")
