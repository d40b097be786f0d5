"""Federated self-supervised pretraining: `train.objective = "simclr"` (fedir.client.objectives.SimCLR),
its projection head (fedir.models.add_projection_head), what its sites report at evaluation
(fedir.client.pretraining), and its model.pt as the next study's `model.init`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedir.client.client_app import build_client_app
from fedir.client.objectives import ObjectiveParams, SimCLR, build_objective
from fedir.client.pretraining import NOT_SCORED, pretraining_metrics
from fedir.client.training import TrainConfig, train
from fedir.config import Settings, SettingsError
from fedir.models import PROJECTION, build_model, encoder_names, head_name
from fedir.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ROUND_KEY,
    check_pretraining,
    decode_evaluation,
    encode_evaluation,
)
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.medmnist import import_medmnist
from fedir.tasks import task_of
from tests.toy_medmnist import SIZE, toy_npz


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fed")
    npz = toy_npz(root / "toy.npz", {"train": 80, "val": 24, "test": 24})
    record = import_medmnist(npz, root / "sites", sites=2, seed=0, labelled_fraction=0.1)
    return ";".join(str(root / "sites" / s) for s in record["per_site"])


def _settings(sites: str, out: Path, **kw) -> Settings:
    base = dict(federation_sites=sites, model_image_size=SIZE, train_rounds=1, train_local_steps=3,
                train_batch_size=16, eval_bootstrap=10, bias_bootstrap=0, output_dir=str(out))
    return Settings(**{**base, **kw})


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- the loss, the head, the training loop ---------------------------------------------------

def test_the_loss_is_lower_for_two_identical_views_than_for_unrelated_images():
    model = build_model("resnet_small", projection=32).eval()
    objective = SimCLR(ObjectiveParams(temperature=0.5))
    x, other = _images(12, 0), _images(12, 1)
    with torch.no_grad():
        same = float(objective.pair_loss(model, x, x))
        unrelated = float(objective.pair_loss(model, x, other))
    assert same < unrelated
    assert unrelated > 0.9 * math.log(2 * 12 - 1)  # a random pairing is near chance


def test_the_projection_head_is_outside_the_encoder_and_the_classifier_and_changes_no_other_weight():
    plain = build_model("resnet_small", seed=3)
    with_head = build_model("resnet_small", seed=3, projection=16)
    assert head_name(with_head) == "fc" and encoder_names(with_head) == encoder_names(plain)
    extra = set(with_head.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith(PROJECTION + ".") for k in extra)
    assert all(torch.equal(v, with_head.state_dict()[k]) for k, v in plain.state_dict().items())
    assert with_head(_images(2, 0)).shape == (2, 2)  # the network still outputs its class logits
    assert getattr(with_head, PROJECTION)[-1].out_features == 16


def test_simclr_trains_on_every_image_labelled_or_not_and_weighs_its_update_by_them():
    model = build_model("resnet_small", projection=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = torch.full((20,), -1, dtype=torch.int64)  # no label at all
    objective = build_objective("simclr", ObjectiveParams(seed=1))
    result = train(model, _images(20, 2), labels, objective, TrainConfig(steps=2, batch_size=8), torch.device("cpu"))
    assert result.steps == 2 and result.n_labelled == 0 and result.n_unlabelled == 20 and result.weight == 20
    assert math.isfinite(result.loss)
    after = model.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["projection.0.weight"], after["projection.0.weight"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])  # the classifier gets no gradient


def test_a_model_without_its_projection_head_is_refused_by_the_objective():
    with pytest.raises(ValueError, match="projection head"):
        SimCLR().loss(build_model("resnet_small"), _images(4, 0), torch.zeros(4), None)


def test_pretraining_metrics_are_bounded_and_name_their_chance_level():
    model = build_model("resnet_small", projection=16)
    metrics = pretraining_metrics(model, _images(10, 3), torch.device("cpu"), SimCLR(ObjectiveParams(seed=4)),
                                  batch_size=6)
    assert metrics["n_images"] == 10 and 0 <= metrics["view_match"] <= 1
    assert metrics["contrastive_chance"] == pytest.approx((6 * math.log(11) + 4 * math.log(7)) / 10)
    repeat = pretraining_metrics(model, _images(10, 3), torch.device("cpu"), SimCLR(ObjectiveParams(seed=4)),
                                 batch_size=6)
    assert repeat == metrics  # seeded views: every round scores the same ones
    lone = pretraining_metrics(model, _images(1, 3), torch.device("cpu"), SimCLR())
    assert lone == {"n_images": 1, "contrastive_loss": None, "contrastive_chance": None, "view_match": None}


def test_the_pretraining_evaluation_crosses_the_wire_and_a_malformed_one_is_refused():
    empty = task_of("classification").site_metrics(np.zeros(0, dtype=np.int64), np.zeros(0), [], n_boot=0,
                                                   seed=0, threshold=0.5, bins=4, classes=2, time_bins=2,
                                                   time_bin_days=1.0)
    split = {"n_images": 7, "contrastive_loss": 2.1, "contrastive_chance": 2.5, "view_match": 0.4}
    content = encode_evaluation("a", empty, None, empty, pretraining={"test": split, "val": {**split, "n_images": 3}})
    name, out = decode_evaluation(content)
    assert name == "a" and out["contrastive_loss"] == pytest.approx(2.1) and out["val"]["n_images"] == 3
    assert content.metric_records["metrics"]["num-examples"] == 7  # weighted by the images scored
    for bad in ({"test": split}, {"test": {**split, "view_match": float("nan")}, "val": split},
                {"test": {**split, "n_images": -1}, "val": split}, {"test": {**split, "extra": 1}, "val": split}):
        with pytest.raises(ValueError, match="pretraining"):
            check_pretraining(bad)


# ---- a pretraining study, then fine-tuning from its model.pt ----------------------------------

def _capturing(log: list[dict]):
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            log.append({"site": context.node_config["partition-id"],
                        "round": int(msg.content.config_records[CONFIG_KEY][ROUND_KEY]),
                        "received": {k: a.numpy().copy() for k, a in msg.content.array_records[ARRAYS_KEY].items()},
                        "weight": int(reply.content.metric_records["metrics"]["num-examples"])})
        return reply

    return mod


def test_a_pretraining_round_trains_and_its_model_is_the_next_studys_init(federation, tmp_path):
    pre_out = tmp_path / "pretrain"
    settings = _settings(federation, pre_out, train_objective="simclr", eval_select="last", train_projection_dim=16)
    log: list[dict] = []
    grid = InProcessGrid(build_client_app(settings, mods=[_capturing(log)]), 2, settings.to_run_config())
    summary = run_study(grid, settings, pre_out, scenario="pretrain")
    assert summary["status"] == "finished"
    # every image trains, labelled (10%) or not: the update's weight is far above the labelled count
    train_rows = json.loads((pre_out / "summary.json").read_text())
    assert all(entry["weight"] > 10 for entry in log) and len(log) == 2
    pre = train_rows["pretraining"]
    assert pre["objective"] == "simclr" and set(pre["per_site"]) == set(train_rows["sites"])
    for split in ("test", "val"):
        entry = pre["global"][split]
        assert entry["n_images"] > 0 and entry["contrastive_loss"] is not None
        assert 0 <= entry["view_match"] <= 1 and entry["contrastive_chance"] > 0
    assert train_rows["global"]["auc"] is None
    site = train_rows["per_site"][train_rows["sites"][0]]
    assert site["reasons"]["auc"] == NOT_SCORED
    html = (pre_out / "report.html").read_text()
    assert "Self-supervised pretraining" in html and "view match" in html
    pretrained = torch.load(pre_out / "model.pt", weights_only=True)
    assert any(k.startswith(PROJECTION + ".") for k in pretrained)
    assert not torch.equal(pretrained["conv1.weight"], build_model("resnet_small", seed=0).state_dict()["conv1.weight"])

    # fine-tuning: the pretrained encoder reaches every site; the projection head does not
    fine_out = tmp_path / "finetune"
    fine = _settings(federation, fine_out, model_init=str(pre_out / "model.pt"))
    log = []
    grid = InProcessGrid(build_client_app(fine, mods=[_capturing(log)]), 2, fine.to_run_config())
    summary = run_study(grid, fine, fine_out, scenario="finetune")
    assert summary["status"] == "finished"
    first = [e for e in log if e["round"] == 1]
    assert sorted(e["site"] for e in first) == [0, 1]
    for entry in first:
        assert np.array_equal(entry["received"]["conv1.weight"], pretrained["conv1.weight"].numpy())
        assert not any(k.startswith(PROJECTION) for k in entry["received"])
    init = json.loads((fine_out / "summary.json").read_text())["model_init"]
    # every weight of the network loads; model.pt's BatchNorm step counters (saved as float
    # (1,) arrays) stay the model's own, their counts alone left new, and the head is dropped
    counters = {k for k in init["new"]}
    assert init["from"] == "checkpoint" and all(k.endswith("num_batches_tracked") for k in counters)
    assert {d["key"] for d in init["dropped"]} - counters == {k for k in pretrained if k.startswith(PROJECTION)}
    assert json.loads((fine_out / "summary.json").read_text())["pretraining"] is None
    assert "Self-supervised pretraining" not in (fine_out / "report.html").read_text()


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "named"), [
    ({}, "eval.select"),  # the default val-auc: nothing to score on validation
    ({"eval_select": "last", "data_inputs": "clinical"}, "data.inputs"),
    ({"eval_select": "last", "train_mixup_alpha": 0.2}, "train.mixup-alpha"),
    ({"eval_select": "last", "train_personalise": "finetune"}, "train.personalise"),
    ({"eval_select": "last", "baseline_clinical": True}, "baseline.clinical"),
    ({"eval_select": "last", "data_frame_policy": "volume"}, "volume"),
    ({"eval_select": "last", "task_kind": "survival"}, "train.objective"),
    ({"eval_select": "last", "train_patience": 2}, "train.patience"),
])
def test_simclr_refuses_what_it_cannot_serve_naming_the_setting(overrides, named):
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        Settings(train_objective="simclr", **overrides)


def test_simclr_on_tabular_sites_is_refused_before_round_1(tmp_path):
    sites = []
    rng = np.random.default_rng(0)
    for s in range(2):
        site = tmp_path / f"tab{s}"
        site.mkdir()
        with (site / "manifest.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["patient_id", "label", "clin_a"])
            w.writeheader()
            w.writerows({"patient_id": f"p{s}-{i}", "label": i % 2, "clin_a": float(rng.normal())} for i in range(30))
        sites.append(str(site))
    settings = _settings(";".join(sites), tmp_path / "run", train_objective="simclr", eval_select="last")
    log: list[dict] = []
    grid = InProcessGrid(build_client_app(settings, mods=[_capturing(log)]), 2, settings.to_run_config())
    with pytest.raises(SettingsError, match="tabular rows"):
        run_study(grid, settings, tmp_path / "run", scenario="test")
    assert log == []
