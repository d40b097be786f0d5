"""Task kind "survival": time to event with censoring (`time` in days, `event` 0/1), a Cox model.

The model has one output, a risk score (the log hazard ratio: a linear Cox model on a
tabular site; on an imaging site the network's one-output risk head, each image carrying
its patient's time and event, fedir.client.inputs; a patient's risk is the mean of its
images', `per_patient`). Training minimises the negative Cox partial log-likelihood with
Efron's handling of tied event times (torchsurv), averaged over the batch's distinct event
times (torchsurv's "mean"; torchsurv sums in float32). A batch without an event, or of one
row (the last batch of an epoch can be), has no pair to order: its loss is zero, and so is
its gradient; the optimiser still takes the step, so Adam's moments carry the earlier
batches' direction over it. The risk set is the batch, so a step informs only as much as
its batch holds events: about B x the event share for train.batch-size B (fedir.config
refuses B < 2 for this kind, which could never order a pair). An imaging patient's images
are rows with the same time, tied, which Efron's correction handles. Evaluation is
fedir.tasks.survival_metrics (C-indices with patient-bootstrap CIs, pair counts, the joint
histogram, k-suppressed Kaplan-Meier).

A row must carry both: a missing or negative time, or an event that is not 0/1, is
refused with its row number (there is no "unlabelled" survival row: a patient without
follow-up cannot be in a survival study).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedir.tasks import survival_metrics

NAME = "survival"
TARGET_COLUMNS = ("time", "event")
target_width = 2  # (time, event) per row, float32
SUMMARY_METRICS = survival_metrics.SURVIVAL_SCALARS
SELECTION_METRIC = "c_index"
CROSS_SITE_METRIC = None  # bias.cross-site is refused (fedir.config.check_task)
USES_OBJECTIVES = False  # the Cox loss only: no semi-supervised objective, no MixUp


def parse_target(cells: Mapping[str, str], num_classes: int | None = None) -> tuple[float, float]:
    """(time, event) of one row; RowError for a missing, non-numeric or negative time or an
    event other than 0/1."""
    from fedir.tasks import RowError

    raw_time, raw_event = cells.get("time", "").strip(), cells.get("event", "").strip()
    if raw_time == "":
        raise RowError("time is missing (follow-up in days is required)", "a time is missing")
    try:
        time = float(raw_time)
    except ValueError:
        raise RowError(f"time {raw_time!r} is not a number of days", "a time is not a number") from None
    if not math.isfinite(time) or time < 0:
        raise RowError(f"time {raw_time!r} is negative or not finite", "a time is negative or not finite")
    if raw_event not in ("0", "1", "0.0", "1.0"):
        raise RowError(f"event {raw_event!r} is not 0 (censored) or 1 (event observed)",
                       "an event is not 0 or 1")
    return time, float(raw_event[0])


def n_outputs(num_classes: int) -> int:
    return 1


def loss(output: Any, target: Any) -> Any:
    """Negative Cox partial log-likelihood (Efron ties) of (B, 1) risks for (B, 2) targets
    [time, event]; 0 (with a gradient of 0) for a batch without an event."""
    import torch
    from torchsurv.loss.cox import neg_partial_log_likelihood

    # at least float32 (bfloat16 under autocast is too coarse for a log-sum-exp), float64 kept
    risk = output.reshape(-1).to(torch.promote_types(output.dtype, torch.float32))
    event = target[:, 1] > 0.5
    if risk.numel() < 2 or not bool(event.any()):  # one patient: log(e^r / e^r) = 0 exactly
        return risk.sum() * 0.0
    return neg_partial_log_likelihood(risk, event, target[:, 0].to(risk.dtype), ties_method="efron",
                                      reduction="mean")


def score(output: Any) -> Any:
    """The risk score: the single output."""
    return output.float().reshape(-1)


def per_patient(target: np.ndarray, scores: np.ndarray, patients: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, event, risk) per patient, in order of first appearance, from one row per image:
    a patient's risk is the mean of its images' risks (its images share its time and event,
    fedir.client.manifest). A tabular site's rows are its patients: returned as they are.

    Args:
        target: (N, 2) [time, event] per row; scores: (N,) risks; patients: N patient ids.
    """
    target = np.asarray(target, dtype=float).reshape(-1, 2)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    if len(patients) != len(scores) or len(scores) != len(target):
        raise ValueError(f"{len(target)} targets, {len(scores)} scores and {len(patients)} patient ids")
    _, first, index = np.unique(np.asarray(patients, dtype=object).astype(str), return_index=True,
                                return_inverse=True)
    order = np.argsort(first)  # patients in order of first appearance
    risk = np.bincount(index, weights=scores, minlength=len(first)) / np.bincount(index, minlength=len(first))
    rows = first[order]
    return target[rows, 0], target[rows, 1].astype(int), risk[order]


def site_metrics(target: np.ndarray, scores: np.ndarray, patients: Sequence[str], *, n_boot: int, seed: int,
                 bins: int, time_bins: int, time_bin_days: float, **_: Any) -> dict:
    """fedir.tasks.survival_metrics.site_survival_metrics of the patients (`per_patient`: an
    imaging patient's risk is the mean of its images'); `n` counts the rows scored (images,
    or a tabular site's patients), `n_patients` the patients."""
    time, event, risk = per_patient(target, scores, patients)
    out = survival_metrics.site_survival_metrics(
        time, event, risk, n_boot=n_boot, seed=seed, bins=bins, time_bins=time_bins, time_bin_days=time_bin_days)
    out["n"] = len(patients)
    return out


def pooled_metrics(per_site: Mapping[str, dict], *, time_bins: int, **_: Any) -> dict:
    return survival_metrics.pooled_survival_metrics(per_site, time_bins=time_bins)
