"""Local training objectives: what a site minimises each step.

An objective receives a labelled batch and, when it asks for one, a batch of unlabelled
images of the same site, and returns a scalar loss; after each optimiser step the training
loop calls its `after_step` (the mean teacher's EMA update lives there). The training
loop (fedir.models.train) is the same for all of them, so a semi-supervised objective is a
new class here and a name in OBJECTIVES, nothing else (a segmentation one: a class and a name
in fedir.client.segmentation_objectives, which builds on these classes).

Every objective's labelled batch of 2D images is augmented by the weak view
(fedir.client.augment.weak_view, a small affine) under `augment = "weak"` (the scenario's
`train.augment`, on by default): without it the supervised term sees each training image
unchanged every epoch, and a small site memorises its images. Tabular rows and 3D volumes
pass unaugmented: the views are 2D image transforms.

An objective instance serves one local training run (the ClientApp builds one per round):
the mean teacher starts from the weights the round starts from. Its randomness (views,
MixUp) comes from a generator on the batch's device, seeded from `ObjectiveParams.seed`,
so no random draw waits for the host.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedir.client.augment import Transform, strong_view, weak_view
from fedir.config import Augment, BnViews
from fedir.models import PROJECTION, head_name
from fedir.tasks import task_of


@dataclass(frozen=True)
class ObjectiveParams:
    """The knobs of the objectives (scenario `[train]`: threshold, unlabelled-weight,
    ema-decay, mixup-alpha, augment, temperature, strong-cutout, bn-views; seed is the round's
    training seed). Their ranges are checked
    where the settings are read (fedir.config): a decay of 1 would freeze the teacher."""

    threshold: float = 0.95  # FixMatch: pseudo-labels need this confidence
    unlabelled_weight: float = 1.0  # weight of the unlabelled (or consistency) loss
    ema_decay: float = 0.99  # mean teacher: teacher <- decay * teacher + (1 - decay) * student
    mixup_alpha: float = 0.0  # MixUp of the labelled batch, lambda ~ Beta(alpha, alpha); 0 = off
    augment: Augment = "none"  # "weak": the labelled 2D images get the weak view (Settings default)
    temperature: float = 0.5  # SimCLR: temperature of the NT-Xent loss
    strong_cutout: bool = True  # the strong view ends with Cutout (fedir.client.augment.strong_view)
    bn_views: BnViews = "joint"  # one forward pass over labelled and unlabelled views, or one per view
    seed: int = 0


class Objective(Protocol):
    """The interface of a local objective."""

    name: ClassVar[str]
    uses_unlabelled: ClassVar[bool]
    # True: the objective reads no label; the training loop's batches are every image of the
    # split, labelled or not (SimCLR), and the update's weight is their count
    label_free: ClassVar[bool]

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, 1, S, S) labelled images, y: (B,) class indices, x_unlabelled: (B', 1, S, S) or None."""
        ...

    def after_step(self, model: nn.Module) -> None:
        """Called by the training loop after every optimiser step."""
        ...


def mixup(
    x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018): each image mixed with the image perm sends it to,
    lam * x + (1 - lam) * x[perm]; its target is lam * y + (1 - lam) * y[perm], returned as
    the two label vectors (y, y[perm]) so the loss needs no one-hot encoding."""
    return lam * x + (1 - lam) * x[perm], y, y[perm]


def mixed_cross_entropy(
    logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float
) -> torch.Tensor:
    """Cross-entropy against the soft target lam * onehot(y_a) + (1 - lam) * onehot(y_b).
    Without MixUp (lam == 1) that is one cross-entropy: computing the zero-weighted second
    term would cost every supervised step a second loss and its backward."""
    if lam == 1.0:
        return F.cross_entropy(logits, y_a)
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


class _Base:
    """What every objective shares: the labelled batch (weak view under augment = "weak",
    then MixUp'ed when mixup_alpha > 0), its loss, and the seeded generators."""

    label_free: ClassVar[bool] = False

    def __init__(self, params: ObjectiveParams = ObjectiveParams()) -> None:
        self.params = params
        self.labelled_view: Transform | None = weak_view() if params.augment == "weak" else None
        self._device_gen: torch.Generator | None = None
        self._host_rng = np.random.default_rng(params.seed)

    def generator(self, device: torch.device) -> torch.Generator:
        """The objective's generator on `device` (created, seeded, on first use)."""
        if self._device_gen is None:
            self._device_gen = torch.Generator(device=device).manual_seed(self.params.seed)
        return self._device_gen

    def labelled_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(images, y_a, y_b, lam) for mixed_cross_entropy: the weak view of a (B, 1, H, W)
        batch under augment = "weak" (other shapes, tabular rows or 3D volumes, as they
        are), then MixUp when mixup_alpha > 0, else lam = 1."""
        if self.labelled_view is not None and x.dim() == 4:
            x = self.labelled_view(x, self.generator(x.device))
        if self.params.mixup_alpha <= 0:
            return x, y, y, 1.0
        # lambda is one host scalar per step: drawn on the host, so the device never syncs.
        lam = float(self._host_rng.beta(self.params.mixup_alpha, self.params.mixup_alpha))
        perm = torch.randperm(x.shape[0], generator=self.generator(x.device), device=x.device)
        return (*mixup(x, y, lam, perm), lam)

    def labelled_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the labelled batch alone (MixUp'ed when mixup_alpha > 0)."""
        x_in, y_a, y_b, lam = self.labelled_batch(x, y)
        return mixed_cross_entropy(model(x_in), y_a, y_b, lam)

    def forward_views(self, model: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The model's outputs on each of `views` (batches of one shape but their first):
        under bn_views = "joint" one forward pass over their concatenation, so BatchNorm
        normalises every view with their mixed batch statistics (the FixMatch reference
        implementation's choice); under "per-view" one pass per view, each normalised with
        its own statistics, so the strong views' physics and noise do not shift those of
        the labelled images (the running statistics then take one update per view)."""
        if self.params.bn_views == "per-view":
            return [model(v) for v in views]
        return list(model(torch.cat(list(views))).split([v.shape[0] for v in views]))

    def after_step(self, model: nn.Module) -> None:
        """Nothing to do after a step, unless an objective keeps extra state."""


class Supervised(_Base):
    """Cross-entropy on the labelled images only; unlabelled images are not used."""

    name: ClassVar[str] = "supervised"
    uses_unlabelled: ClassVar[bool] = False

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        return self.labelled_loss(model, x, y)


class TaskLoss(_Base):
    """A task kind's own loss on the labelled rows (fedir.tasks: survival's Cox partial
    likelihood), for kinds whose targets are not class indices: no view, no MixUp."""

    name: ClassVar[str] = "task_loss"
    uses_unlabelled: ClassVar[bool] = False

    def __init__(self, task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 params: ObjectiveParams = ObjectiveParams()) -> None:
        super().__init__(params)
        self.task_loss = task_loss

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        return self.task_loss(model(x), y)


class FixMatch(_Base):
    """FixMatch (Sohn et al. 2020): the model's confident predictions on a weak view of an
    unlabelled image are the targets of its predictions on a strong view.

    One forward pass over [labelled, weak, strong] (as the reference implementation does,
    so batch-norm statistics see all three), or one per view under bn_views = "per-view"
    (_Base.forward_views); the weak view's prediction is detached, and
    an unlabelled image contributes only when its top class probability reaches
    `threshold`. The unlabelled loss is averaged over all unlabelled images (masked ones
    count as 0), as in the paper.
    """

    name: ClassVar[str] = "fixmatch"
    uses_unlabelled: ClassVar[bool] = True

    def __init__(
        self,
        params: ObjectiveParams = ObjectiveParams(),
        weak: Transform | None = None,
        strong: Transform | None = None,
    ) -> None:
        super().__init__(params)
        self.weak = weak or weak_view()
        self.strong = strong or strong_view(cutout=params.strong_cutout)

    def terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(supervised loss, unlabelled loss, mask (B',) of the pseudo-labels used)."""
        g = self.generator(x.device)
        x_in, y_a, y_b, lam = self.labelled_batch(x, y)
        weak, strong = self.weak(x_unlabelled, g), self.strong(x_unlabelled, g)
        logits_x, logits_w, logits_s = self.forward_views(model, [x_in, weak, strong])
        confidence, pseudo = torch.softmax(logits_w.detach().float(), dim=1).max(dim=1)
        mask = confidence >= self.params.threshold
        per_image = F.cross_entropy(logits_s, pseudo, reduction="none")
        unlabelled = (per_image * mask).mean()
        return mixed_cross_entropy(logits_x, y_a, y_b, lam), unlabelled, mask

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        if x_unlabelled is None or x_unlabelled.shape[0] == 0:
            return self.labelled_loss(model, x, y)
        supervised, unlabelled, _ = self.terms(model, x, y, x_unlabelled)
        return supervised + self.params.unlabelled_weight * unlabelled


class MeanTeacher(_Base):
    """Mean teacher (Tarvainen and Valpola 2017): a teacher whose weights are an exponential
    moving average of the student's gives targets for the student on unlabelled images.

    The student sees one perturbed view of an unlabelled image, the teacher another; the
    consistency loss is the mean squared difference of their class probabilities (the
    choice of the paper and of FedIRM). The teacher starts as a copy of the model at the
    first step, i.e. the global model of the round, and after every optimiser step moves
    toward the student: floating-point parameters and buffers (batch-norm running
    statistics) by ema_decay, integer buffers copied. It predicts in eval mode, with its
    own averaged statistics.
    """

    name: ClassVar[str] = "mean_teacher"
    uses_unlabelled: ClassVar[bool] = True

    def __init__(
        self, params: ObjectiveParams = ObjectiveParams(), view: Transform | None = None
    ) -> None:
        super().__init__(params)
        self.view = view or strong_view(cutout=params.strong_cutout)
        self.teacher: nn.Module | None = None

    def _teacher_of(self, model: nn.Module) -> nn.Module:
        if self.teacher is None:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return self.teacher

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        teacher = self._teacher_of(model)
        if x_unlabelled is None or x_unlabelled.shape[0] == 0:
            return self.labelled_loss(model, x, y)
        x_in, y_a, y_b, lam = self.labelled_batch(x, y)
        g = self.generator(x.device)
        student_view, teacher_view = self.view(x_unlabelled, g), self.view(x_unlabelled, g)
        logits_x, logits_u = self.forward_views(model, [x_in, student_view])
        with torch.no_grad():
            target = torch.softmax(teacher(teacher_view).float(), dim=1)
        consistency = F.mse_loss(torch.softmax(logits_u.float(), dim=1), target)
        return mixed_cross_entropy(logits_x, y_a, y_b, lam) + self.params.unlabelled_weight * consistency

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * student."""
        if self.teacher is None:
            return
        student = model.state_dict()
        for key, t in self.teacher.state_dict().items():
            s = student[key]
            if t.is_floating_point():
                t.lerp_(s, 1 - self.params.ema_decay)
            else:
                t.copy_(s)


def projected(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding (B, D), projection (B, P)) of a batch: the features the classifier layer
    receives (fedir.models.head_name, caught by a forward pre-hook, as
    fedir.client.embedding does) and the projection head's output on them (a model built
    with fedir.models.add_projection_head)."""
    captured: list[torch.Tensor] = []
    head = dict(model.named_modules())[head_name(model)]
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    features = captured[0].flatten(1)
    projection = getattr(model, PROJECTION, None)
    if projection is None:
        raise ValueError("train.objective = simclr needs the model's projection head "
                         "(fedir.models.build_model(projection=...))")
    return features, projection(features)


class SimCLR(_Base):
    """SimCLR (Chen et al. 2020): two strong views of every image (fedir's X-ray physics
    augmentations, fedir.client.augment.strong_view), one forward pass over both, and
    MONAI's NT-Xent loss (`monai.losses.ContrastiveLoss`: cosine similarity over
    temperature, each view's partner the positive, the batch's other 2B - 2 views the
    negatives) on the projection head's outputs (fedir.models.add_projection_head).

    Labels are never read (`label_free`): the training loop batches every image of the
    site's training split, labelled or not. What is learned for the next study is the
    encoder; the projection head is dropped when model.pt becomes its model.init.
    """

    name: ClassVar[str] = "simclr"
    uses_unlabelled: ClassVar[bool] = False  # no separate unlabelled batch: every image is in the batch
    label_free: ClassVar[bool] = True

    def __init__(self, params: ObjectiveParams = ObjectiveParams(), view: Transform | None = None) -> None:
        super().__init__(params)
        # MONAI here, not at import: a tabular site's ClientApp never needs it (fedir.models.build_model)
        from monai.losses import ContrastiveLoss

        self.view = view or strong_view(cutout=params.strong_cutout)
        self.criterion = ContrastiveLoss(temperature=params.temperature)

    def views(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent strong views of a (B, 1, H, W) batch."""
        return self.view(x, generator), self.view(x, generator)

    @staticmethod
    def pair_projections(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections (float32) of two aligned batches, in one forward pass over both."""
        _, z = projected(model, torch.cat([a, b]))
        z_a, z_b = z.float().chunk(2)
        return z_a, z_b

    def pair_loss(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the projections of two aligned batches (a[i] and b[i] a positive pair)."""
        return self.criterion(*self.pair_projections(model, a, b))

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("train.objective = simclr augments 2D images (B, 1, H, W); "
                             f"got a batch of shape {tuple(x.shape)}")
        return self.pair_loss(model, *self.views(x, self.generator(x.device)))


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Supervised, FixMatch, MeanTeacher, SimCLR)
}


def objectives_of(kind: str) -> dict[str, Callable[[ObjectiveParams], Objective]]:
    """The `train.objective` names of a task kind whose kind module says USES_OBJECTIVES:
    this module's for classification, fedir.client.segmentation_objectives' (built on these
    classes, hence imported here) for segmentation."""
    if kind == "segmentation":
        from fedir.client.segmentation_objectives import SEGMENTATION_OBJECTIVES

        return SEGMENTATION_OBJECTIVES
    return dict(OBJECTIVES)


def build_objective(name: str, params: ObjectiveParams = ObjectiveParams(),
                    kind: str = "classification") -> Objective:
    """The objective named in the scenario's `[train] objective`, with its knobs, from the
    task kind's table (objectives_of); for a kind that trains with its own loss only
    (survival), that loss."""
    task = task_of(kind)
    if not task.USES_OBJECTIVES:
        return TaskLoss(task.loss, params)
    table = objectives_of(kind)
    try:
        return table[name](params)
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; available: {', '.join(sorted(table))}"
        ) from None
