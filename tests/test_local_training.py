"""One round's recipe (fedir.client.local_training): the learning-rate schedule across rounds."""

import math

import pytest
import torch

from fedir.client.local_training import LR_FLOOR, lr_factor, round_recipe
from fedir.client.training import _optimizer
from fedir.config import Settings
from fedir.models import build_model


def test_cosine_factor_runs_from_one_to_the_floor():
    assert lr_factor("cosine", 1, 10) == 1.0
    assert lr_factor("cosine", 10, 10) == pytest.approx(LR_FLOOR)
    # halfway through the rounds, halfway between 1 and the floor
    assert lr_factor("cosine", 3, 5) == pytest.approx(LR_FLOOR + (1 - LR_FLOOR) / 2)
    assert lr_factor("cosine", 2, 4) == pytest.approx(LR_FLOOR + (1 - LR_FLOOR) * (1 + math.cos(math.pi / 3)) / 2)
    factors = [lr_factor("cosine", r, 10) for r in range(1, 11)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # strictly decreasing
    assert lr_factor("cosine", 12, 10) == pytest.approx(LR_FLOOR)  # a resumed study past its rounds
    assert lr_factor("cosine", 1, 1) == 1.0
    assert {lr_factor("constant", r, 10) for r in range(1, 11)} == {1.0}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_rounds_optimiser_trains_at_the_scheduled_rate(schedule):
    settings = Settings(train_lr=0.02, train_rounds=5, train_lr_schedule=schedule)
    model = build_model("logreg", n_features=3)
    for server_round in (1, 3, 5):
        _, config = round_recipe(settings, seed=0, server_round=server_round)
        opt = _optimizer(model, config)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * lr_factor(schedule, server_round, 5))
    _, last = round_recipe(settings, seed=0, server_round=5)
    assert last.lr == pytest.approx(0.02 * (LR_FLOOR if schedule == "cosine" else 1.0))


def test_personalisation_fine_tunes_at_the_rounds_rate(monkeypatch):
    """Fine-tuning before scoring (fedir.client.personalise) uses the recipe of the round it scores."""
    from flwr.app import ConfigRecord, Context, RecordDict

    import fedir.client.personalise as personalise
    from fedir.client.inputs import SiteView

    seen = []
    monkeypatch.setattr(personalise, "train",
                        lambda model, x, y, objective, recipe, device, unlabelled=None: seen.append(recipe.lr))
    settings = Settings(train_lr=0.1, train_rounds=3, train_lr_schedule="cosine", train_personalise="finetune")
    site = SiteView(name="s", tabular=False, train_x=torch.zeros(2, 1, 4, 4), train_y=torch.zeros(2, dtype=torch.long),
                    test_x=torch.zeros(1, 1, 4, 4), test_y=torch.zeros(1, dtype=torch.long), test_patients=["a"],
                    val_x=torch.zeros(1, 1, 4, 4), val_y=torch.zeros(1, dtype=torch.long), val_patients=["b"],
                    label_counts={})
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    personalise.personalised(torch.nn.Linear(1, 2), settings, site, ConfigRecord({"server-round": 3}), context)
    assert seen == [pytest.approx(0.1 * LR_FLOOR)]


@pytest.mark.parametrize("objective", ["fixmatch", "mean_teacher"])
def test_the_recipe_passes_the_strong_view_and_forward_pass_settings(objective):
    default, _ = round_recipe(Settings(train_objective=objective), seed=0, server_round=1)
    assert default.params.strong_cutout and default.params.bn_views == "joint"
    settings = Settings(train_objective=objective, train_strong_cutout=False, train_bn_views="per-view")
    built, _ = round_recipe(settings, seed=0, server_round=1)
    assert not built.params.strong_cutout and built.params.bn_views == "per-view"
    view = built.strong if objective == "fixmatch" else built.view
    assert "Cutout" not in [type(t).__name__ for t in view.transforms]
