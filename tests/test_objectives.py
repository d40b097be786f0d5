"""The local objectives: FixMatch, mean teacher, MixUp, each through the training loop; the
strong view without Cutout and one forward pass per view (train.strong-cutout, train.bn-views)."""

import math

import pytest
import torch
from torch import nn

from fedir.client.augment import Cutout, strong_view, weak_view
from fedir.client.objectives import FixMatch, MeanTeacher, ObjectiveParams, build_objective, mixed_cross_entropy, mixup
from fedir.client.training import TrainConfig, train
from fedir.models import build_model

CPU = torch.device("cpu")


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def _batch(n: int = 8, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.arange(n) % 2
    u = torch.randn(n, 1, size, size, generator=g)
    return x, y, u


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "mean_teacher"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_each_objective_gives_a_finite_loss_with_gradients(name, alpha):
    model = _tiny_model()
    x, y, u = _batch()
    loss = build_objective(name, ObjectiveParams(threshold=0.0, mixup_alpha=alpha)).loss(model, x, y, u)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "mean_teacher"])
def test_each_objective_runs_under_bf16_autocast(name):
    """fedir.models.train calls the objective under bf16 autocast on a GPU; CPU autocast mimics it."""
    x, y, u = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_objective(name, ObjectiveParams(threshold=0.0, mixup_alpha=0.4)).loss(_tiny_model(), x, y, u)
    assert math.isfinite(float(loss.detach()))


def test_fixmatch_masks_pseudo_labels_below_the_threshold():
    x, y, u = _batch()
    model = _tiny_model()  # untrained: its probabilities stay near 0.5
    supervised, unlabelled, mask = FixMatch(ObjectiveParams(threshold=0.99)).terms(model, x, y, u)
    assert not mask.any() and float(unlabelled.detach()) == 0.0
    total = FixMatch(ObjectiveParams(threshold=0.99, unlabelled_weight=5.0)).loss(model, x, y, u)
    assert torch.allclose(total, supervised)
    _, unlabelled, mask = FixMatch(ObjectiveParams(threshold=0.0)).terms(model, x, y, u)
    assert mask.all() and float(unlabelled.detach()) > 0


def test_fixmatch_pseudo_labels_come_from_the_weak_view():
    """With identity views, a confident model's pseudo-labels equal its own predictions, so
    the unlabelled loss is the cross-entropy of its predictions against their argmax."""
    x, y, u = _batch()
    model = _tiny_model()
    same = lambda t, g: t  # noqa: E731
    fm = FixMatch(ObjectiveParams(threshold=0.0), weak=same, strong=same)
    model.eval()  # identical outputs for the weak and strong copies
    _, unlabelled, _ = fm.terms(model, x, y, u)
    logits = model(u)
    expected = nn.functional.cross_entropy(logits, logits.argmax(1))
    assert torch.allclose(unlabelled, expected, atol=1e-6)


def test_mean_teacher_ema_moves_the_teacher_toward_the_student():
    model = _tiny_model()
    x, y, u = _batch()
    mt = MeanTeacher(ObjectiveParams(ema_decay=0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mt.loss(model, x, y, u).backward()
    opt.step()

    def distance() -> float:
        s, t = model.state_dict(), mt.teacher.state_dict()
        return sum(float((s[k].float() - t[k].float()).norm()) for k in s if s[k].is_floating_point())

    before = distance()
    assert before > 0  # the student stepped, the teacher did not
    mt.after_step(model)
    after = distance()
    assert after == pytest.approx(0.9 * before, rel=0.05)
    assert not any(p.requires_grad for p in mt.teacher.parameters())


def test_mixup_mixes_images_and_labels():
    x, y, _ = _batch(4)
    perm = torch.tensor([1, 0, 3, 2])  # every image meets one of the other class
    x_mix, y_a, y_b = mixup(x, y, 0.7, perm)
    assert torch.allclose(x_mix, 0.7 * x + 0.3 * x[perm])
    assert torch.equal(y_a, y) and torch.equal(y_b, 1 - y)
    logits = torch.randn(4, 2)
    soft = 0.7 * nn.functional.one_hot(y, 2).float() + 0.3 * nn.functional.one_hot(1 - y, 2).float()
    assert torch.allclose(mixed_cross_entropy(logits, y_a, y_b, 0.7),
                          nn.functional.cross_entropy(logits, soft))


def test_mixup_alpha_changes_the_supervised_loss():
    x, y, u = _batch()
    model = _tiny_model()
    plain = build_objective("supervised").loss(model, x, y, None)
    mixed = build_objective("supervised", ObjectiveParams(mixup_alpha=1.0)).loss(model, x, y, None)
    assert not torch.allclose(plain, mixed)


@pytest.mark.parametrize("name", ["fixmatch", "mean_teacher"])
def test_training_runs_with_each_semi_supervised_objective(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 16, 16, generator=g)
    labels = torch.arange(24) % 2
    labels[::2] = -1  # half unlabelled
    model = build_model("resnet_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objective = build_objective(name, ObjectiveParams(threshold=0.5, mixup_alpha=0.4))
    result = train(model, x, labels, objective, TrainConfig(epochs=1, batch_size=4, unlabelled_ratio=2), CPU)
    assert result.steps == 3 and math.isfinite(result.loss)
    assert result.n_labelled == 12 and result.n_unlabelled == 12
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if name == "mean_teacher":  # the loop called after_step: the teacher followed the student
        teacher = objective.teacher.state_dict()
        assert any(not torch.equal(before[k], teacher[k]) for k in before)



@pytest.mark.parametrize("name", ["supervised", "fixmatch", "mean_teacher"])
def test_every_objective_augments_its_labelled_images_under_weak(name):
    """Under augment = "weak" the labelled batch the model sees is the weak view of the
    images (not the images), the same view for the same seed; under "none" the images."""
    x, y, u = _batch()
    first: list[torch.Tensor] = []  # the student's input of each run (the mean teacher's copy runs later)

    for augment in ("none", "weak", "weak"):
        model, calls = _tiny_model(), len(first)
        hook = model.register_forward_pre_hook(
            lambda _m, args, n=calls + 1: None if len(first) == n else first.append(args[0][: x.shape[0]].detach().clone()))
        build_objective(name, ObjectiveParams(augment=augment, seed=3)).loss(model, x, y, u)
        hook.remove()
    plain, weak_a, weak_b = first
    assert torch.equal(plain, x)
    assert not torch.allclose(weak_a, x) and torch.equal(weak_a, weak_b)


def test_weak_augmentation_leaves_tabular_rows_and_volumes_as_they_are():
    objective = build_objective("supervised", ObjectiveParams(augment="weak"))
    rows, labels = torch.randn(6, 3), torch.arange(6) % 2
    assert torch.equal(objective.labelled_batch(rows, labels)[0], rows)
    volumes = torch.randn(2, 1, 4, 4, 4)
    assert torch.equal(objective.labelled_batch(volumes, labels[:2])[0], volumes)


def _batch_sizes(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The batch size of every forward pass `model` makes from now on (and the hook's handle)."""
    sizes: list[int] = []
    return sizes, model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))


def test_the_default_fixmatch_loss_is_the_one_joint_pass_with_the_full_strong_view():
    """The defaults (train.strong-cutout = true, train.bn-views = joint) compute FixMatch as
    before the settings existed: the generator draws the labelled weak view, then the weak
    and the full strong view of the unlabelled batch, one forward pass over all three."""
    x, y, u = _batch()
    params = ObjectiveParams(threshold=0.5, augment="weak", seed=5)
    assert params.strong_cutout and params.bn_views == "joint"
    loss = FixMatch(params).loss(_tiny_model(), x, y, u)
    g = torch.Generator().manual_seed(5)
    x_in, weak = weak_view()(x, g), weak_view()(u, g)
    strong = strong_view()(u, g)
    logits_x, logits_w, logits_s = _tiny_model()(torch.cat([x_in, weak, strong])).split([8, 8, 8])
    confidence, pseudo = torch.softmax(logits_w, dim=1).max(dim=1)
    unlabelled = (nn.functional.cross_entropy(logits_s, pseudo, reduction="none") * (confidence >= 0.5)).mean()
    assert torch.equal(loss, nn.functional.cross_entropy(logits_x, y) + unlabelled)
    assert torch.equal(loss, FixMatch(params).loss(_tiny_model(), x, y, u))  # same seed, same loss
    for changed in ({"strong_cutout": False}, {"bn_views": "per-view"}):
        other = ObjectiveParams(threshold=0.5, augment="weak", seed=5, **changed)
        assert not torch.allclose(FixMatch(other).loss(_tiny_model(), x, y, u), loss)


def test_fixmatch_builds_its_strong_view_with_or_without_cutout():
    assert Cutout in [type(t) for t in FixMatch().strong.transforms]
    assert Cutout not in [type(t) for t in FixMatch(ObjectiveParams(strong_cutout=False)).strong.transforms]
    for name in ("mean_teacher", "simclr"):
        view = build_objective(name, ObjectiveParams(strong_cutout=False)).view
        assert Cutout not in [type(t) for t in view.transforms]


@pytest.mark.parametrize(("bn_views", "passes"), [("joint", [24]), ("per-view", [8, 8, 8])])
def test_fixmatch_makes_one_pass_over_its_views_or_one_pass_per_view(bn_views, passes):
    x, y, u = _batch()
    model = _tiny_model()
    sizes, hook = _batch_sizes(model)
    FixMatch(ObjectiveParams(threshold=0.0, bn_views=bn_views)).loss(model, x, y, u)
    hook.remove()
    assert sizes == passes


@pytest.mark.parametrize(("bn_views", "passes"), [("joint", [16]), ("per-view", [8, 8])])
def test_the_mean_teachers_student_makes_one_pass_or_one_per_view(bn_views, passes):
    x, y, u = _batch()
    model = _tiny_model()
    mt = MeanTeacher(ObjectiveParams(bn_views=bn_views))
    mt._teacher_of(model)  # the teacher (a copy made before the hook) predicts in its own passes
    sizes, hook = _batch_sizes(model)
    mt.loss(model, x, y, u)
    hook.remove()
    assert sizes == passes


def test_per_view_passes_normalise_each_view_with_its_own_batch_statistics():
    """Under per-view the labelled images' logits are the model's on them alone, and the
    BatchNorm running mean takes one momentum update per view, from that view's own channel
    means; under joint one update from the three views' mixed mean."""
    x, y, u = _batch()
    running: dict[str, torch.Tensor] = {}
    labelled: dict[str, torch.Tensor] = {}
    for bn_views in ("joint", "per-view"):
        model = _tiny_model()
        bn = model[1]
        inputs: list[torch.Tensor] = []
        hook = bn.register_forward_pre_hook(lambda _m, args, seen=inputs: seen.append(args[0].detach().clone()))
        supervised, _, _ = FixMatch(ObjectiveParams(threshold=0.0, bn_views=bn_views)).terms(model, x, y, u)
        hook.remove()
        expected = torch.zeros(4)
        for batch in inputs:
            expected = (1 - bn.momentum) * expected + bn.momentum * batch.mean(dim=(0, 2, 3))
        assert torch.allclose(bn.running_mean, expected, atol=1e-6)
        running[bn_views], labelled[bn_views] = bn.running_mean.clone(), supervised.detach()
    assert not torch.allclose(running["joint"], running["per-view"])
    own = nn.functional.cross_entropy(_tiny_model()(x), y)  # the labelled batch alone (augment = none)
    assert torch.allclose(labelled["per-view"], own, atol=1e-6)
    assert not torch.allclose(labelled["joint"], own)
