"""Transfer learning: `model.init` (a checkpoint as round 0's global model, with the report of
what loaded) and `train.freeze = "encoder"` (the sites train the head only for the first rounds).

The checkpoints are built here: a model fedir builds with another seed, its head renamed and
every key prefixed as data-parallel training saves them, nested as MONAI bundles nest them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedir.cli import main
from fedir.client.client_app import build_client_app
from fedir.client.local_training import round_recipe
from fedir.client.objectives import ObjectiveParams, build_objective
from fedir.client.training import TrainConfig, train
from fedir.config import Settings, SettingsError
from fedir.models import build_model, encoder_names, head_name
from fedir.protocol import ARRAYS_KEY, CONFIG_KEY, ROUND_KEY
from fedir.server.model_init import MIN_LOADED_SHARE, ModelInitError, initialise
from fedir.server.report.study import model_init_section
from fedir.server.server_app import run_study
from fedir.simulations.companion import clinical_settings
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.medmnist import import_medmnist
from tests.toy_medmnist import SIZE, toy_npz


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fed")
    record = import_medmnist(toy_npz(root / "toy.npz", {"train": 120, "val": 40, "test": 40}), root / "sites", sites=2, seed=0)
    return ";".join(str(root / "sites" / s) for s in record["per_site"])


def _checkpoint(path: Path, *, seed: int = 7, name: str = "resnet_small") -> dict[str, torch.Tensor]:
    """A pretrained-looking checkpoint: fedir's model with another seed, head renamed to
    `head.*`, keys prefixed `module.`, nested under "state_dict" beside other entries."""
    state = build_model(name, seed=seed).state_dict()
    renamed = {("module." + k.replace("fc.", "head.")): v.clone() for k, v in state.items()}
    torch.save({"state_dict": renamed, "epoch": 12, "optimizer": {"lr": 0.1}}, path)
    return renamed


def _settings(sites: str, out: Path, **kw) -> Settings:
    base = dict(federation_sites=sites, model_image_size=SIZE, train_rounds=2, train_local_steps=3,
                train_batch_size=16, eval_bootstrap=10, bias_bootstrap=0, output_dir=str(out))
    return Settings(**{**base, **kw})


def test_prefix_nesting_and_a_renamed_head_are_reported(tmp_path):
    saved = _checkpoint(tmp_path / "ckpt.pt")
    model = build_model("resnet_small", seed=0)
    fresh_head = model.fc.weight.detach().clone()
    report = initialise(model, tmp_path / "ckpt.pt")
    assert report["prefix_stripped"] == "module."
    assert report["n_new"] == 2 and report["new"] == ["fc.weight", "fc.bias"]
    assert {d["key"] for d in report["dropped"]} == {"module.head.weight", "module.head.bias"}
    assert all(d["reason"] == "no such entry in the model" for d in report["dropped"])
    assert report["n_loaded"] == len(model.state_dict()) - 2 and report["loaded_share"] > 0.99
    state = model.state_dict()
    for key, value in saved.items():
        name = key.removeprefix("module.")
        if name in state:
            assert torch.equal(state[name], value), name
    assert torch.equal(model.fc.weight, fresh_head)  # the new head keeps its seeded init


def test_a_head_of_another_shape_is_dropped_with_its_shapes(tmp_path):
    state = build_model("resnet_small", seed=3).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(5, 128), torch.zeros(5)
    torch.save(state, tmp_path / "five.pth")
    report = initialise(build_model("resnet_small"), tmp_path / "five.pth")
    assert report["prefix_stripped"] == "" and report["new"] == ["fc.weight", "fc.bias"]
    assert {d["key"]: d["reason"] for d in report["dropped"]} == {
        "fc.weight": "shape (5, 128), the model's is (2, 128)", "fc.bias": "shape (5,), the model's is (2,)"}


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    torch.save(build_model("resnet10").state_dict(), tmp_path / "resnet10.pt")
    model = build_model("resnet_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelInitError, match=rf"at least {MIN_LOADED_SHARE:.0%} needed"):
        initialise(model, tmp_path / "resnet10.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


class Payload:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_missing_unreadable_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(ModelInitError, match="no such file"):
        initialise(build_model(), tmp_path / "absent.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(ModelInitError, match="not a readable PyTorch state dict"):
        initialise(build_model(), tmp_path / "noise.pt")
    torch.save({"weights": Payload()}, tmp_path / "object.pt")
    with pytest.raises(ModelInitError, match="not a readable PyTorch state dict"):
        initialise(build_model(), tmp_path / "object.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ModelInitError, match="holds no state dict"):
        initialise(build_model(), tmp_path / "empty.pt")


def test_safetensors_load_or_say_what_is_missing(tmp_path):
    model = build_model("resnet_small", seed=5)
    path = tmp_path / "ckpt.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"{}")
        with pytest.raises(ModelInitError, match="needs the safetensors package"):
            initialise(build_model(), path)
        return
    save_file(model.state_dict(), str(path))
    target = build_model("resnet_small")
    assert initialise(target, path)["n_new"] == 0
    assert torch.equal(target.conv1.weight, model.conv1.weight)


def test_freeze_settings_are_checked():
    with pytest.raises(SettingsError, match="set model.init"):
        Settings(train_freeze="encoder", train_freeze_rounds=1, train_rounds=3)
    with pytest.raises(SettingsError, match="below train.rounds"):
        Settings(train_freeze="encoder", train_freeze_rounds=3, train_rounds=3, model_init="x.pt")
    with pytest.raises(SettingsError, match="at least 1"):
        Settings(train_freeze="encoder", train_freeze_rounds=0, train_rounds=3, model_init="x.pt")
    with pytest.raises(SettingsError, match="needs train.freeze"):
        Settings(train_freeze_rounds=2)
    Settings(train_freeze="encoder", train_freeze_rounds=2, train_rounds=3, model_init="x.pt")


def test_the_encoder_is_everything_but_the_last_linear_layer():
    assert head_name(build_model("resnet_small")) == "fc"
    assert head_name(build_model("densenet121")) == "class_layers.out"
    mlp = build_model("mlp", n_features=3)
    assert head_name(mlp) == "2" and encoder_names(mlp) == {"0.weight", "0.bias"}
    assert encoder_names(build_model("logreg", n_features=3)) == set()  # all head
    resnet = build_model("resnet_small")
    assert "conv1.weight" in encoder_names(resnet) and not any(n.startswith("fc.") for n in encoder_names(resnet))


def test_a_frozen_encoder_keeps_weights_and_batchnorm_statistics_and_the_head_trains():
    settings = Settings(train_freeze="encoder", train_freeze_rounds=1, train_rounds=2, model_init="x.pt",
                        train_local_steps=4, train_batch_size=8)
    x, y = torch.rand(32, 1, SIZE, SIZE), torch.randint(0, 2, (32,))
    for server_round, frozen in ((1, True), (2, False)):
        objective, recipe = round_recipe(settings, seed=0, server_round=server_round)
        assert recipe.freeze_encoder is frozen
        model = build_model("resnet_small")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, x, y, objective, recipe, torch.device("cpu"))
        after = model.state_dict()
        encoder = [k for k in after if not k.startswith("fc.")]
        changed = [k for k in encoder if not torch.equal(before[k], after[k])]
        assert not torch.equal(before["fc.weight"], after["fc.weight"])
        if frozen:
            assert changed == []  # weights, running means and variances, counters
        else:
            assert "conv1.weight" in changed and "bn1.running_mean" in changed


def test_without_freezing_the_optimiser_sees_every_parameter():
    model = build_model("resnet_small")
    train(model, torch.rand(8, 1, SIZE, SIZE), torch.randint(0, 2, (8,)), build_objective("supervised", ObjectiveParams()),
          TrainConfig(steps=1), torch.device("cpu"))
    assert all(p.requires_grad for p in model.parameters())


def _capturing(log: list[dict]):
    """A client mod: each train message's round, received arrays and replied arrays, per site."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            log.append({"site": context.node_config["partition-id"],
                        "round": int(msg.content.config_records[CONFIG_KEY][ROUND_KEY]),
                        "received": {k: a.numpy().copy() for k, a in msg.content.array_records[ARRAYS_KEY].items()},
                        "sent": {k: a.numpy().copy() for k, a in reply.content.array_records[ARRAYS_KEY].items()}})
        return reply

    return mod


def test_the_checkpoint_reaches_every_site_and_the_encoder_is_frozen_then_fine_tuned(federation, tmp_path):
    saved = _checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "run"
    settings = _settings(federation, out, model_init=str(tmp_path / "ckpt.pt"), train_freeze="encoder",
                         train_freeze_rounds=1, train_rounds=2)
    log: list[dict] = []
    grid = InProcessGrid(build_client_app(settings, mods=[_capturing(log)]), 2, settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="test")
    assert summary["status"] == "finished"
    first = [entry for entry in log if entry["round"] == 1]
    assert sorted(e["site"] for e in first) == [0, 1]
    for entry in first:  # round 1's global model is the checkpoint (its renamed head excepted)
        for key, value in saved.items():
            name = key.removeprefix("module.")
            if name in entry["received"]:
                assert np.array_equal(entry["received"][name], value.numpy()), name
        assert "fc.weight" in entry["received"]
        encoder = [k for k in entry["sent"] if not k.startswith("fc.")]
        assert all(np.array_equal(entry["sent"][k], entry["received"][k]) for k in encoder)
        assert not np.array_equal(entry["sent"]["fc.weight"], entry["received"]["fc.weight"])
    for entry in (e for e in log if e["round"] == 2):
        assert not np.array_equal(entry["sent"]["conv1.weight"], entry["received"]["conv1.weight"])
    written = json.loads((out / "summary.json").read_text())
    init = written["model_init"]
    assert init["from"] == "checkpoint" and init["n_new"] == 2 and init["n_dropped"] == 2
    assert init["freeze"] == "encoder" and init["freeze_rounds"] == 1
    html = (out / "report.html").read_text()
    assert "Starting model" in html and "module.head.weight" in html and "rounds 1-1" in html


def test_a_checkpoint_matching_too_little_stops_the_study_before_round_1(federation, tmp_path):
    torch.save(build_model("resnet10").state_dict(), tmp_path / "other.pt")
    out = tmp_path / "run"
    settings = _settings(federation, out, model_init=str(tmp_path / "other.pt"))
    log: list[dict] = []
    grid = InProcessGrid(build_client_app(settings, mods=[_capturing(log)]), 2, settings.to_run_config())
    with pytest.raises(ModelInitError, match="of the model's parameters"):
        run_study(grid, settings, out, scenario="test")
    assert log == []  # no site trained
    written = json.loads((out / "summary.json").read_text())
    assert written["status"] == "failed" and written["rounds"] == 0
    assert any("model.init" in n["message"] for n in written["notes"] if n["kind"] == "failed")


def test_a_missing_checkpoint_in_a_scenario_is_one_line(federation, tmp_path, capsys):
    sites = ", ".join(f'"{s}"' for s in federation.split(";"))
    scenario = tmp_path / "study.toml"
    scenario.write_text(f'[federation]\nsites = [{sites}]\n[model]\ninit = "weights/absent.pt"\n')
    assert main(["simulate", str(scenario), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.init = 'weights/absent.pt'" in lines[0] and "no such file" in lines[0]


def test_the_clinical_companion_does_not_inherit_the_imaging_checkpoint():
    imaging = Settings(model_init="/weights/radimagenet.pt", train_freeze="encoder", train_freeze_rounds=1,
                       train_rounds=3, baseline_clinical=True)
    companion = clinical_settings(imaging)
    assert (companion.model_init, companion.train_freeze, companion.train_freeze_rounds) == ("", "none", 0)


def test_the_starting_model_section_escapes_what_it_shows(tmp_path):
    path = tmp_path / "bundle<img src=x>.pt"
    _checkpoint(path)
    report = initialise(build_model("resnet_small"), path)
    html = str(model_init_section({"from": "checkpoint", **report, "freeze": "none", "freeze_rounds": 0}))
    assert "bundle&lt;img src=x&gt;.pt" in html and "<img" not in html
    assert "module.head.weight (no such entry in the model)" in html and "2 new" in html
