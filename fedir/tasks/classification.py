"""Task kind "classification": a class index per row (`label`), softmax outputs, AUC and friends.

Wraps what fedir had before task kinds existed: fedir.metrics' per-site metrics and their
pooling, cross-entropy (the objectives of fedir.client.objectives build on it, MixUp and
the semi-supervised ones included), and the positive-class probability as the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedir import metrics
from fedir.tasks import multiclass_metrics

NAME = "classification"
TARGET_COLUMNS = ("label",)
target_width = 0  # one class index per row (int64, -1 = unlabelled)
SUMMARY_METRICS = metrics.SCALAR_METRICS
SELECTION_METRIC = "auc"
CROSS_SITE_METRIC = "auc"  # the cross-site matrix (bias.cross-site; K > 2 refuses it: fedir.config.check_classes)
USES_OBJECTIVES = True  # train.objective (supervised, fixmatch, mean_teacher) applies


def parse_target(cells: Mapping[str, str], num_classes: int | None) -> int | None:
    """A class index in 0..num_classes-1 (any non-negative one when None); empty = unlabelled."""
    from fedir.tasks import RowError

    raw = cells.get("label", "").strip()
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RowError(f"label {raw!r} is not a class index", "a label is not a class index") from None
    if not value.is_integer() or value < 0:
        raise RowError(f"label {raw!r} is not a non-negative class index",
                       "a label is not a non-negative class index")
    if num_classes is not None and value >= num_classes:
        classes = f"0..{num_classes - 1}"
        raise RowError(f"label {raw!r} is outside the task's classes {classes} (empty = unlabelled)",
                       f"a label is outside the task's classes {classes}")
    return int(value)


def n_outputs(num_classes: int) -> int:
    return num_classes


def loss(output: Any, target: Any) -> Any:
    """Cross-entropy of (B, C) logits against (B,) class indices."""
    import torch.nn.functional as F

    return F.cross_entropy(output, target)


def score(output: Any) -> Any:
    """The positive-class probability (B,) of (B, 2) logits; the (B, K) class probabilities
    of (B, K > 2) logits (task.classes = K: the metrics rank each class one-vs-rest)."""
    import torch

    probabilities = torch.softmax(output.float(), dim=1)
    return probabilities[:, 1] if output.shape[1] == 2 else probabilities


def site_metrics(target: np.ndarray, scores: np.ndarray, patients: Sequence[str], *, n_boot: int, seed: int,
                 threshold: float, bins: int, classes: int = 2, priors: np.ndarray | None = None,
                 **_: Any) -> dict:
    """fedir.metrics.site_metrics of (N,) positive-class probabilities; with `classes` = K > 2
    (task.classes), fedir.tasks.multiclass_metrics' of the (N, K) class probabilities (the
    argmax, or the balanced decision with the site's training `priors`; no threshold)."""
    if classes > 2:
        return multiclass_metrics.site_multiclass_metrics(
            target, np.asarray(scores, dtype=float).reshape(-1, classes), patients, n_boot=n_boot, seed=seed,
            bins=bins, priors=priors)
    return metrics.site_metrics(target, scores, patients, n_boot=n_boot, seed=seed, threshold=threshold, bins=bins)


def pooled_metrics(per_site: Mapping[str, dict], *, n_boot: int, seed: int, **_: Any) -> dict:
    """The pool of the sites' binary aggregates, or of their K > 2 ones (they carry `classes`)."""
    if any("classes" in entry for entry in per_site.values()):
        return multiclass_metrics.pooled_multiclass_metrics(per_site, n_boot=n_boot, seed=seed)
    return metrics.pooled_metrics(per_site, n_boot=n_boot, seed=seed)
