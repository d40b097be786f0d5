"""Optional SMOTE on a tabular site's labelled training rows (`train.smote`), inside the site.

A site whose patients are mostly of one class (Switzerland in the UCI heart federation:
30 of 30 positive) pulls the shared model toward its prevalence. SMOTE (Chawla et al.
2002, imbalanced-learn) adds synthetic minority-class rows, each on the segment between
a minority row and one of its k nearest minority neighbours, until the classes are
balanced. The synthetic rows are made from the site's patients, so they are patient data
too: they exist only in this function's return value for one round's local training, are
never stored, never counted as patients (the update's weight and label counts are the
real ones) and never sent; only the model update they helped train leaves the site.
It runs after standardisation, so that "nearest" is measured on comparable scales.
"""

from __future__ import annotations

import numpy as np
import torch
from imblearn.over_sampling import SMOTE

MAX_NEIGHBOURS = 5  # imbalanced-learn's default k


def oversampled(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y) with synthetic minority rows appended, and how many were added.

    Unlabelled rows (y = -1) are kept as they are and not used. Nothing is added when a
    class is absent (there is nothing to interpolate from) or has a single row (no
    neighbour), or when the classes are already balanced.
    """
    labelled = y >= 0
    xl, yl = x[labelled].numpy(), y[labelled].numpy()
    classes, counts = np.unique(yl, return_counts=True)
    if len(classes) < 2 or counts.min() < 2 or counts.min() == counts.max():
        return x, y, 0
    k = min(MAX_NEIGHBOURS, int(counts.min()) - 1)
    xs, ys = SMOTE(k_neighbors=k, random_state=seed).fit_resample(xl, yl)
    # imbalanced-learn returns the original rows first, then the synthetic ones
    new_x = torch.from_numpy(np.ascontiguousarray(xs[len(xl):], dtype=xl.dtype))
    new_y = torch.from_numpy(np.ascontiguousarray(ys[len(yl):], dtype=yl.dtype))
    return torch.cat([x, new_x]), torch.cat([y, new_y]), len(new_y)
