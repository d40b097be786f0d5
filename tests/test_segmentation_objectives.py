"""The segmentation objectives (fedir.client.segmentation_objectives) on tiny batches: the
mean teacher's consistency, the FixMatch pseudo-mask's geometry and its confidence mask, and
one short in-process federation trained with train.objective = mean_teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedir.client.augment import PairedView, RandomAffine
from fedir.client.objectives import ObjectiveParams, build_objective
from fedir.client.segmentation_objectives import (
    SegmentationFixMatch,
    SegmentationMeanTeacher,
    SegmentationSupervised,
)
from fedir.config import Settings, SettingsError, check_task

S = 16


def identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def identity_pair() -> PairedView:
    """No rotation, zoom or shift, no intensity transform: theta is the identity."""
    return PairedView(RandomAffine(degrees=0.0, translate=0.0, scale=0.0))


class Rot90(PairedView):
    """A fixed quarter turn of image and target (exact on a square pixel grid)."""

    def __init__(self) -> None:
        super().__init__(RandomAffine())

    def __call__(self, x, mask, generator):
        return x.rot90(1, (2, 3)), mask.rot90(1, (2, 3))


class Pointwise(nn.Module):
    """Per-pixel logits from the pixel's intensity alone (a 1x1 convolution): what it predicts
    at a pixel moves with the pixel under any geometry."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4.0


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, S, S, generator=g)
    y = torch.randint(0, 3, (2, 1, S, S), generator=g)
    u = torch.randn(3, 1, S, S, generator=g)
    return x, y, u


def test_the_segmentation_kind_builds_its_own_objectives() -> None:
    assert isinstance(build_objective("supervised", kind="segmentation"), SegmentationSupervised)
    assert isinstance(build_objective("fixmatch", kind="segmentation"), SegmentationFixMatch)
    assert isinstance(build_objective("mean_teacher", kind="segmentation"), SegmentationMeanTeacher)


def test_mean_teacher_consistency_is_zero_when_student_is_teacher_and_not_otherwise() -> None:
    x, y, u = batch()
    model = Pointwise()
    objective = SegmentationMeanTeacher(ObjectiveParams(), weak=identity, strong=identity_pair())
    _, consistency = objective.terms(model, x, y, u)  # the teacher is a copy of the model
    assert float(consistency.detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        model.conv.bias.add_(torch.tensor([1.0, -1.0, 0.5]))  # the student moves, the teacher stays
    _, consistency = objective.terms(model, x, y, u)
    assert float(consistency.detach()) > 1e-3
    objective.after_step(model)  # the EMA pulls the teacher toward the student
    _, closer = objective.terms(model, x, y, u)
    assert 0 < float(closer.detach()) < float(consistency.detach())


def test_mean_teacher_targets_follow_the_strong_views_geometry() -> None:
    """Under a quarter turn of the strong view, the warped teacher map is the student's own
    (same weights, a pointwise model): a target left unwarped would differ."""
    x, y, u = batch(1)
    objective = SegmentationMeanTeacher(ObjectiveParams(), weak=identity, strong=Rot90())
    _, consistency = objective.terms(Pointwise(), x, y, u)
    assert float(consistency.detach()) == pytest.approx(0.0, abs=1e-10)


def test_fixmatch_pseudo_mask_is_unchanged_by_an_identity_view_and_moves_with_the_geometry() -> None:
    x, y, u = batch(2)
    model = Pointwise()
    with torch.no_grad():
        probs = torch.softmax(model(u), dim=1)
    expected = probs.argmax(dim=1, keepdim=True)
    kept = (probs.max(dim=1, keepdim=True).values >= 0.6).long()
    objective = SegmentationFixMatch(ObjectiveParams(threshold=0.6), weak=identity, strong=identity_pair())
    _, _, target = objective.terms(model, x, y, u)
    assert torch.equal(target[:, :1], expected) and torch.equal(target[:, 1:], kept)
    assert 0 < int(kept.sum()) < kept.numel()  # the threshold keeps some pixels and drops others
    turned = SegmentationFixMatch(ObjectiveParams(threshold=0.6), weak=identity, strong=Rot90())
    _, _, target = turned.terms(model, x, y, u)
    assert torch.equal(target[:, :1], expected.rot90(1, (2, 3)))
    # the pseudo-mask is the model's own prediction on the strong view (pointwise model)
    assert torch.equal(target[:, 0], model(u.rot90(1, (2, 3))).argmax(dim=1))


def test_a_fixmatch_pixel_below_the_threshold_contributes_nothing() -> None:
    x, y, u = batch(3)
    model = Pointwise()
    objective = SegmentationFixMatch(ObjectiveParams(threshold=0.6), weak=identity, strong=identity_pair())
    _, unlabelled, target = objective.terms(model, x, y, u)
    logits = model(u)
    per_pixel = nn.functional.cross_entropy(logits, target[:, 0], reduction="none")
    assert float(unlabelled) == pytest.approx(float((per_pixel * target[:, 1]).sum() / per_pixel.numel()))
    # a dropped pixel's gradient is zero: changing the image there changes nothing
    b, i, j = (target[:, 1] == 0).nonzero()[0].tolist()
    u_grad = u.clone().requires_grad_(True)
    _, unlabelled, _ = SegmentationFixMatch(ObjectiveParams(threshold=0.6), weak=identity,
                                            strong=identity_pair()).terms(model, x, y, u_grad)
    unlabelled.backward()
    assert u_grad.grad is not None and float(u_grad.grad[b, 0, i, j]) == 0.0
    kept = (target[:, 1] == 1).nonzero()[0].tolist()
    assert float(u_grad.grad[kept[0], 0, kept[1], kept[2]]) != 0.0
    # a threshold above every confidence keeps nothing: the unlabelled term is zero
    none = SegmentationFixMatch(ObjectiveParams(threshold=1.0), weak=identity, strong=identity_pair())
    supervised, unlabelled, _ = none.terms(model, x, y, u)
    assert float(unlabelled) == 0.0 and math.isfinite(float(supervised))


def test_segmentation_accepts_the_semi_supervised_objectives_and_still_refuses_mixup_and_smote() -> None:
    for objective in ("fixmatch", "mean_teacher"):
        check_task(Settings(task_kind="segmentation", train_objective=objective))
    with pytest.raises(SettingsError, match="train.mixup-alpha"):
        check_task(Settings(task_kind="segmentation", train_objective="fixmatch", train_mixup_alpha=0.2))
    with pytest.raises(SettingsError, match="train.smote"):
        check_task(Settings(task_kind="segmentation", train_smote=True))
    with pytest.raises(SettingsError, match="train.objective"):
        check_task(Settings(task_kind="survival", train_objective="mean_teacher"))


def test_a_short_mean_teacher_federation_trains_on_unlabelled_frames_and_reports_dice(tmp_path) -> None:
    """Two rounds in process, two tiny sites with one outlined frame per cine run: every site
    trains on its masked frames and its unlabelled ones, and the summary carries Dice."""
    import sqlite3

    from fedir.client.inputs import view_of
    from fedir.simulations.inprocess import run_inprocess
    from fedir.simulations.scenario import load_scenario
    from fedir.simulations.synthetic import generate_federation

    generate_federation(tmp_path / "fed", sites=2, patients=8, seed=5, image_size=32, progress=False,
                        mask_fraction=0.0)
    toml = tmp_path / "mt.toml"
    toml.write_text('[task]\nkind = "segmentation"\n[federation]\nsites = ["fed/site-0", "fed/site-1"]\n'
                    '[train]\nrounds = 2\nlocal-epochs = 2\nlr = 0.01\nbatch-size = 4\nobjective = "mean_teacher"\n'
                    '[model]\nimage-size = 32\n[data]\nframe-policy = "all"\ntest-fraction = 0.3\n'
                    'val-fraction = 0.2\n[eval]\nbootstrap = 20\n')
    settings = load_scenario(toml)
    summary = run_inprocess(settings, tmp_path / "run")
    assert summary["rounds"] == 2 and summary["task"] == "segmentation"
    with sqlite3.connect(tmp_path / "run" / "runs.sqlite") as db:
        trained = dict(db.execute("SELECT site || ':' || round, value FROM metrics WHERE split = 'train' "
                                  "AND metric = 'n_unlabelled'").fetchall())
        steps = [v for (v,) in db.execute("SELECT value FROM metrics WHERE split = 'train' AND metric = 'steps'")]
    for site in ("site-0", "site-1"):
        view = view_of(str((tmp_path / "fed" / site).resolve()), settings)
        assert view.train_unlabelled is not None and len(view.train_unlabelled) > 0
        assert trained[f"{site}:1"] == trained[f"{site}:2"] == len(view.train_unlabelled)
        entry = summary["per_site"][site]
        assert entry["dice"] is not None and 0 <= entry["dice"] <= 1, entry["reasons"]
    assert len(steps) == 4 and min(steps) > 0
    assert summary["global"]["dice"] is not None


@pytest.mark.parametrize(("bn_views", "fixmatch", "mean_teacher"),
                         [("joint", [3, 5], [5]), ("per-view", [3, 2, 3], [2, 3])])
def test_the_labelled_and_strong_frames_share_a_pass_or_take_one_each(bn_views, fixmatch, mean_teacher) -> None:
    """train.bn-views: the labelled frames and the strong views in one forward pass or one
    each (FixMatch's weak-view prediction is its own pass either way; the mean teacher's
    target is the teacher's); train.strong-cutout = false leaves Cutout out of the strong view."""
    x, y, u = batch()
    params = ObjectiveParams(threshold=0.0, bn_views=bn_views, strong_cutout=False)
    for objective, passes in ((SegmentationFixMatch(params), fixmatch), (SegmentationMeanTeacher(params), mean_teacher)):
        assert "Cutout" not in [type(t).__name__ for t in objective.strong.intensity.transforms]
        model = Pointwise()
        if isinstance(objective, SegmentationMeanTeacher):
            objective._teacher_of(model)  # copied before the hook
        sizes: list[int] = []
        hook = model.register_forward_pre_hook(lambda _m, args, seen=sizes: seen.append(args[0].shape[0]))
        assert math.isfinite(float(objective.loss(model, x, y, u).detach()))
        hook.remove()
        assert sizes == passes
