"""The pooled arm's batches (federation.pooled-batches): mixed, or each from one site.

A FedAvg site trains every batch on one scanner; a pooled node that shuffles every site's
rows together normalises four scanners in one BatchNorm batch, which is not the same
model. Under "per-site" every step of the pooled node is one site's: its labelled batch
and its unlabelled draw.
"""

from typing import ClassVar

import pytest
import torch
from flwr.app import Context, RecordDict

import fedir.client.arms as arms
from fedir.client.inputs import SiteView
from fedir.client.training import TrainConfig, _batches, train
from fedir.config import Settings, SettingsError


class Recorder:
    """An objective that records, for each step, the sites its rows came from (every
    pixel of an image holds its site index) and returns a loss the optimiser can step on."""

    name: ClassVar[str] = "recorder"
    uses_unlabelled: ClassVar[bool] = True

    def __init__(self) -> None:
        self.steps: list[tuple[set[int], set[int]]] = []

    def loss(self, model, x, y, unlabelled):
        seen = {int(v) for v in x[:, 0, 0, 0]}
        unl = set() if unlabelled is None else {int(v) for v in unlabelled[:, 0, 0, 0]}
        self.steps.append((seen, unl))
        return model(x.flatten(1)).sum() * 0.0 + model.weight.sum()

    def after_step(self, model) -> None:
        pass


def _rows(counts: list[int], labelled_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images whose pixels hold their site index, labels with -1 for the unlabelled half."""
    sites = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = sites.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    y = torch.zeros(len(sites), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    y[torch.rand(len(sites), generator=gen) > labelled_share] = -1
    return x, y, sites


def test_grouped_batches_hold_one_group_and_cover_every_row_once():
    groups = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)
    batches = list(_batches(len(groups), 4, torch.Generator().manual_seed(3), groups))
    assert all(len(set(groups[b].tolist())) == 1 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(groups)))
    assert len(batches) == 2 + 2 + 3  # each group cut on its own: ceil(7/4) + ceil(5/4) + ceil(9/4)
    # the batch order is shuffled across groups, not one site after the other
    order = [int(groups[b[0]]) for b in batches]
    assert order != sorted(order)
    # without groups, the pass is one shuffle of every row (the mixed default, unchanged)
    plain = list(_batches(len(groups), 4, torch.Generator().manual_seed(3)))
    assert torch.equal(torch.cat(plain), torch.randperm(len(groups), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("per_site", [True, False])
def test_every_step_trains_on_one_sites_labelled_batch_and_unlabelled_draw(per_site: bool):
    x, y, sites = _rows([30, 20, 40])
    objective = Recorder()
    model = torch.nn.Linear(4, 2)
    train(model, x, y, objective, TrainConfig(epochs=3, batch_size=8, unlabelled_ratio=2), torch.device("cpu"),
          sites=(sites, None) if per_site else None)
    assert objective.steps
    one_site = [len(lab) == 1 and unl <= lab for lab, unl in objective.steps]
    if per_site:
        assert all(one_site)
        assert {next(iter(lab)) for lab, _ in objective.steps} == {0, 1, 2}
    else:  # the mixed pooled node: batches across sites (what per-site exists to avoid)
        assert not all(one_site)


def test_a_segmentation_nodes_separate_unlabelled_frames_follow_their_site():
    x, y, sites = _rows([12, 12], labelled_share=2.0)  # every row labelled
    unlabelled = torch.cat([torch.zeros(5, 1, 2, 2), torch.ones(3, 1, 2, 2)])
    objective = Recorder()
    train(torch.nn.Linear(4, 2), x, y, objective, TrainConfig(epochs=2, batch_size=4), torch.device("cpu"),
          unlabelled=unlabelled, sites=(sites, torch.tensor([0] * 5 + [1] * 3)))
    assert all(len(lab) == 1 and unl == lab for lab, unl in objective.steps)
    with pytest.raises(ValueError, match="site of each"):  # separate unlabelled images without their sites
        train(torch.nn.Linear(4, 2), x, y, Recorder(), TrainConfig(epochs=1, batch_size=4), torch.device("cpu"),
              unlabelled=unlabelled, sites=(sites, None))


def _view(name: str, n: int, unlabelled: int | None = None) -> SiteView:
    return SiteView(name=name, tabular=False, train_x=torch.zeros(n, 1, 2, 2), train_y=torch.zeros(n, dtype=torch.long),
                    test_x=torch.zeros(1, 1, 2, 2), test_y=torch.zeros(1, dtype=torch.long), test_patients=["t"],
                    val_x=torch.zeros(1, 1, 2, 2), val_y=torch.zeros(1, dtype=torch.long), val_patients=["v"],
                    label_counts={}, train_unlabelled=None if unlabelled is None else torch.zeros(unlabelled, 1, 2, 2))


def _context(partition: int) -> Context:
    return Context(run_id=0, node_id=partition, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def test_row_sites_follow_the_pooled_nodes_rows(monkeypatch):
    views = {"a": _view("a", 3, 2), "b": _view("b", 1, None), "c": _view("c", 2, 4)}
    monkeypatch.setattr(arms, "view_of", lambda site, settings: views[site])
    settings = Settings(federation_sites="a;b;c", federation_arm="pooled", federation_pooled_batches="per-site",
                        train_objective="fixmatch")
    pooled = _context(0)
    x, _ = arms.training_rows(settings, views["a"], pooled)
    unlabelled = arms.unlabelled_rows(settings, views["a"], pooled)
    found = arms.row_sites(settings, views["a"], pooled)
    assert found is not None and unlabelled is not None
    assert found[0].tolist() == [0, 0, 0, 1, 2, 2] and len(found[0]) == len(x)
    assert found[1] is not None and found[1].tolist() == [0, 0, 2, 2, 2, 2] and len(found[1]) == len(unlabelled)
    # the other nodes train nothing, and the other settings mix
    assert arms.row_sites(settings, views["b"], _context(1)) is None
    for other in (Settings(federation_sites="a;b;c", federation_arm="pooled", federation_pooled_batches="mixed",
                           train_objective="fixmatch"),
                  Settings(federation_sites="a;b;c", federation_pooled_batches="per-site")):
        assert arms.row_sites(other, views["a"], pooled) is None


def test_per_site_pooled_batches_refuse_smotes_siteless_rows():
    with pytest.raises(SettingsError, match="pooled-batches.*smote"):
        Settings(federation_arm="pooled", federation_pooled_batches="per-site", train_smote=True)
    with pytest.raises(SettingsError, match="the default"):
        Settings(federation_arm="pooled", train_smote=True)
    Settings(federation_arm="pooled", federation_pooled_batches="mixed", train_smote=True)  # mixed batches take them
    with pytest.raises(SettingsError):
        Settings(federation_pooled_batches="by-site")
