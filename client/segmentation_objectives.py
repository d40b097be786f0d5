"""Local objectives of task.kind = "segmentation": supervised DiceCE, and FixMatch-style and
mean-teacher consistency on the unlabelled frames of each run.

The same `train.objective` names as for classification (fedir.client.objectives), where the
meaning carries over per pixel; build_objective picks this table for the segmentation kind.
A labelled batch is (B, 1, S, S) images with (B, 1, S, S) int64 label maps, trained with the
kind's DiceCE (fedir.tasks.segmentation.loss) as they are, exactly as under "supervised", so
an arm's difference from supervised is what the unlabelled frames add. The unlabelled
frames (fedir.client.inputs: a training image without a usable mask) have no target; each
semi-supervised objective makes one from a prediction in the frame of a weak view, and moves
it with the strong view's geometry (fedir.client.augment.PairedView: the affine on image and
target alike, intensity and X-ray physics on the image only), so a pixel's target is the
prediction for the same anatomy.

- "fixmatch" (Sohn et al. 2020, per pixel): the pseudo-mask is the argmax of the model's
  prediction on the weak view; a pixel is kept where its top probability reaches
  `threshold`. Mask and kept-pixel flags are warped nearest-neighbour by the strong view
  (a pixel the warp brings from outside the image is not kept); the strong view's
  per-pixel cross-entropy against the pseudo-mask is averaged over all pixels, kept ones
  only contributing (as FixMatch averages over all images).
- "mean_teacher" (Tarvainen and Valpola 2017, per pixel; the teacher and its EMA are
  fedir.client.objectives.MeanTeacher's): the teacher's class probabilities on the weak view,
  warped bilinearly by the strong view's geometry, are the targets of the student's
  probabilities on the strong view; the consistency is their mean squared difference over
  the pixels the warp keeps inside the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedir.client.augment import PairedView, Transform, paired_strong_view, weak_view
from fedir.client.objectives import MeanTeacher, Objective, ObjectiveParams, TaskLoss, _Base
from fedir.tasks import segmentation

DEFAULTS = ObjectiveParams()
INSIDE = 0.999  # mean teacher: a pixel is compared where the warped validity map is at least this


class SegmentationSupervised(TaskLoss):
    """DiceCE on the masked frames only (the kind's loss, fedir.tasks.segmentation)."""

    name: ClassVar[str] = "supervised"

    def __init__(self, params: ObjectiveParams = DEFAULTS) -> None:
        super().__init__(segmentation.loss, params)


class SegmentationFixMatch(_Base):
    """FixMatch per pixel: confident pixels of the weak view's prediction, warped with the
    strong view, are the strong view's targets (module docstring). `weak` acts on images;
    `strong` is a PairedView (its geometry moves the pseudo-mask)."""

    name: ClassVar[str] = "fixmatch"
    uses_unlabelled: ClassVar[bool] = True

    def __init__(self, params: ObjectiveParams = DEFAULTS, weak: Transform | None = None,
                 strong: PairedView | None = None) -> None:
        super().__init__(params)
        self.weak = weak or weak_view()
        self.strong = strong or paired_strong_view(cutout=params.strong_cutout)

    def terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(supervised DiceCE, unlabelled loss, (B', 2, S, S) int64 target in the strong view's
        frame: channel 0 the pseudo-mask, channel 1 1 where the pixel is kept)."""
        g = self.generator(x.device)
        weak = self.weak(x_unlabelled, g)
        with torch.no_grad():
            confidence, pseudo = torch.softmax(model(weak).float(), dim=1).max(dim=1, keepdim=True)
        kept = (confidence >= self.params.threshold).to(torch.int64)
        strong, target = self.strong(weak, torch.cat([pseudo, kept], dim=1), g)
        logits_x, logits_s = self.forward_views(model, [x, strong])
        per_pixel = F.cross_entropy(logits_s.float(), target[:, 0], reduction="none")  # (B', S, S)
        return segmentation.loss(logits_x, y), (per_pixel * target[:, 1]).mean(), target

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
             ) -> torch.Tensor:
        if x_unlabelled is None or x_unlabelled.shape[0] == 0:
            return segmentation.loss(model(x), y)
        supervised, unlabelled, _ = self.terms(model, x, y, x_unlabelled)
        return supervised + self.params.unlabelled_weight * unlabelled


class SegmentationMeanTeacher(MeanTeacher):
    """Mean teacher per pixel: the EMA teacher's probabilities on the weak view, warped with
    the strong view, are the targets of the student's on the strong view (module
    docstring). The teacher, its start and its EMA update are MeanTeacher's."""

    def __init__(self, params: ObjectiveParams = DEFAULTS, weak: Transform | None = None,
                 strong: PairedView | None = None) -> None:
        super().__init__(params, view=weak or weak_view())
        self.strong = strong or paired_strong_view(cutout=params.strong_cutout)

    def terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(supervised DiceCE, consistency)."""
        teacher = self._teacher_of(model)
        g = self.generator(x.device)
        weak = self.view(x_unlabelled, g)
        with torch.no_grad():
            target = torch.softmax(teacher(weak).float(), dim=1)
        inside = torch.ones_like(target[:, :1])
        strong, warped = self.strong(weak, torch.cat([target, inside], dim=1), g)
        logits_x, logits_u = self.forward_views(model, [x, strong])
        keep = (warped[:, -1:] >= INSIDE).to(warped.dtype)
        squared = (torch.softmax(logits_u.float(), dim=1) - warped[:, :-1]).pow(2) * keep
        consistency = squared.sum() / (keep.sum() * target.shape[1]).clamp_min(1.0)
        return segmentation.loss(logits_x, y), consistency

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
             ) -> torch.Tensor:
        self._teacher_of(model)
        if x_unlabelled is None or x_unlabelled.shape[0] == 0:
            return segmentation.loss(model(x), y)
        supervised, consistency = self.terms(model, x, y, x_unlabelled)
        return supervised + self.params.unlabelled_weight * consistency


SEGMENTATION_OBJECTIVES: dict[str, Callable[[ObjectiveParams], Objective]] = {
    cls.name: cls for cls in (SegmentationSupervised, SegmentationFixMatch, SegmentationMeanTeacher)
}
