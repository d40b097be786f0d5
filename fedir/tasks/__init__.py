"""The task contract: what the rest of fedir asks a task kind (`[task] kind`) for, in one place.

A kind is one module here (classification.py, survival.py, segmentation.py) exposing the same names; the
client, the server and the strategies ask `task_of(settings.task_kind)` instead of
branching on the kind, so a new kind (segmentation, multi-class) is a new module and a
line in KINDS. What a kind module defines (docs/design.md, "Adding a task kind"):

- `NAME`, `TARGET_COLUMNS`: its manifest columns (a tabular site of the kind is a
  manifest with these, `clin_*` columns and no `path`);
- `parse_target(cells, num_classes)`: one manifest row's target, or None (unlabelled);
  RowError (message, public text) for a value it refuses: the reader adds the row number;
- `target_width`: 0 for a class index per row, else the number of float target columns;
- `n_outputs(num_classes)`: the model's outputs;
- `loss(output, target)`: the training loss (torch imported inside the function);
- `score(output)`: the model's outputs -> the score its metrics rank (torch inside);
- `site_metrics(target, scores, patients, **eval)` and `pooled_metrics(per_site, **eval)`:
  the evaluation aggregates at a site and their pooling at the server (fedir.protocol
  encodes the site's);
- `SUMMARY_METRICS`: the scalar metrics summary.json's `global` / `per_site.<site>` carry,
  each with `<name>_ci`; `SELECTION_METRIC`: what `eval.select = "val-auc"` maximises;
- `CROSS_SITE_METRIC`: the site-metrics key (with `<name>_ci`) a cell of the cross-site
  matrix carries under `bias.cross-site` (fedir.protocol.encode_cross_site,
  fedir.strategies.cross_site_gap), or None where the kind refuses cross-site evaluation.

Nothing here imports torch at module level: fedir.protocol imports the kinds' metric names.
"""

from __future__ import annotations

from types import ModuleType

from fedir.tasks import classification, segmentation, survival

KINDS: dict[str, ModuleType] = {classification.NAME: classification, survival.NAME: survival,
                                segmentation.NAME: segmentation}


class RowError(ValueError):
    """A manifest cell a kind refuses: `message` for the site's log (may quote the cell),
    `public` without the value (what may leave the site). The reader prefixes the row."""

    def __init__(self, message: str, public: str) -> None:
        super().__init__(message)
        self.public = public


def task_of(kind: str) -> ModuleType:
    """The module of task kind `kind` (a `task.kind` value, checked by fedir.config)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"task.kind = {kind!r}: choose one of {', '.join(KINDS)}") from None
