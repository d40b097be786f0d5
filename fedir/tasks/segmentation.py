"""Task kind "segmentation": a label map per image (0 background, 1 vessel, 2 stenosis).

The target of an image is its mask (fedir.client.masks, the manifest's `mask` column), not
a manifest cell: `TARGET_COLUMNS` is empty, and the images with a usable mask are the
labelled set (fedir.client.inputs). The model is MONAI's `BasicUNet` with three output
channels (the classes are kept apart: stenosis is what a radiologist measures), trained
with MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)`. The score of an image is its
predicted label map (argmax over the channels); evaluation is
fedir.tasks.segmentation_metrics (per-patient Dice and HD95 with patient-bootstrap CIs, a
histogram of per-image Dice; pooled from the sites' sums at the server).

`train.objective` = supervised (DiceCE on the masked frames), fixmatch or mean_teacher
(DiceCE plus a per-pixel consistency on the frames without a mask,
fedir.client.segmentation_objectives); MixUp and SMOTE are refused (fedir.config.check_task).

Every image and mask is resized to `model.image-size` when the site reads it
(fedir.client.imaging.to_model_input, fedir.client.masks), so the model is always given
images of its training size: sliding-window inference has no case to serve and is not
used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedir.tasks import segmentation_metrics

NAME = "segmentation"
TARGET_COLUMNS: tuple[str, ...] = ()  # the target is the row's mask file
target_width = 0
SUMMARY_METRICS = segmentation_metrics.SEG_SCALARS
SELECTION_METRIC = "dice"
CROSS_SITE_METRIC = "dice"  # each site model's per-patient Dice at every site (bias.cross-site)
USES_OBJECTIVES = True  # train.objective: fedir.client.segmentation_objectives (DiceCE + consistency)
MODEL = "basic_unet"  # what model.name = auto builds for this kind (fedir.models)


def parse_target(cells: Mapping[str, str], num_classes: int | None = None) -> None:
    """No manifest cell is a segmentation target (the mask file is): every row is None."""
    return None


def n_outputs(num_classes: int) -> int:
    return segmentation_metrics.N_CLASSES


def loss(output: Any, target: Any) -> Any:
    """MONAI DiceCE of (B, 3, H, W) logits against (B, 1, H, W) label maps."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)(output.float(), target)


def score(output: Any) -> Any:
    """The predicted label map (B, H, W) of (B, 3, H, W) logits, as uint8."""
    return output.argmax(dim=1).to(dtype=__import__("torch").uint8)


def site_metrics(target: np.ndarray, scores: np.ndarray, patients: Sequence[str], *, n_boot: int, seed: int,
                 **_: Any) -> dict:
    """(N, 1, H, W) reference masks and (N, H, W) predicted label maps of one split."""
    return segmentation_metrics.site_segmentation_metrics(target, scores, patients, n_boot=n_boot, seed=seed)


def pooled_metrics(per_site: Mapping[str, dict], **_: Any) -> dict:
    return segmentation_metrics.pooled_segmentation_metrics(per_site)
