"""Settings are checked once, where they are read: allowed values from the Literal types,
ranges, combinations that cannot work, the registries that must agree with the types, the
model that follows the data, and the generated reference in docs/settings.md."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedir.client.client_app import build_client_app
from fedir.client.imaging import FRAME_POLICIES
from fedir.client.objectives import OBJECTIVES
from fedir.client.training import OPTIMIZERS
from fedir.config import (
    FramePolicy,
    ImageModel,
    ObjectiveName,
    Optimizer,
    Settings,
    SettingsError,
    StrategyName,
    TabularModel,
    UpdateDtype,
    allowed,
    hint_of,
    reference_markdown,
)
from fedir.models import MODEL_NAMES, resolve_model
from fedir.protocol import UPDATE_DTYPES, error_text
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.scenario import ScenarioError, load_scenario
from fedir.strategies.registry import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
ENUMERATED = [f for f in fields(Settings) if allowed(hint_of(f))]


@pytest.mark.parametrize("f", ENUMERATED, ids=lambda f: f.name)
def test_an_enumerated_value_outside_its_literal_is_refused_naming_key_value_and_choices(f):
    key = Settings.key_of(f.name)
    with pytest.raises(SettingsError) as info:
        Settings.from_run_config({key: "nope"})
    message = str(info.value)
    assert key in message and "'nope'" in message and "\n" not in message
    assert all(str(value) in message for value in allowed(hint_of(f)))


@pytest.mark.parametrize("key, bad, says", [
    ("strategy.fraction-train", 0.0, "in (0, 1]"),
    ("strategy.fraction-evaluate", 1.5, "in (0, 1]"),
    ("train.lr", 0.0, "> 0"),
    ("train.rounds", 0, ">= 1"),
    ("train.batch-size", 0, ">= 1"),
    ("train.local-steps", -1, ">= 0"),
    ("train.ema-decay", 1.0, "in [0, 1)"),
    ("train.threshold", 1.5, "in [0, 1]"),
    ("train.mixup-alpha", -1.0, ">= 0"),
    ("train.unlabelled-weight", -0.1, ">= 0"),
    ("data.test-fraction", 0.0, "in (0, 1)"),
    ("strategy.beta", 0.5, "in [0, 0.5)"),
    ("eval.bootstrap", -1, ">= 0"),
    ("bias.secondary-to-alarm", -1, ">= 0"),
    ("privacy.noise-multiplier", -0.5, ">= 0"),
])
def test_a_number_out_of_range_is_refused_with_its_range(key, bad, says):
    with pytest.raises(SettingsError) as info:
        Settings.from_run_config({key: bad})
    assert str(info.value) == f"{key} = {bad!r} is out of range; it must be {says}"


def test_frame_policy_takes_its_literal_or_every_k():
    for policy in (*allowed(FramePolicy), "every-1", "every-12"):
        assert Settings(data_frame_policy=policy).data_frame_policy == policy
    for bad in ("every-0", "every-x", "every-", "brightest"):
        with pytest.raises(SettingsError, match="data.frame-policy.*every-K"):
            Settings(data_frame_policy=bad)


@pytest.mark.parametrize("kw, says", [
    (dict(data_val_fraction=0.5, data_test_fraction=0.5), "no patient is left to train on"),
    (dict(data_frame_policy="volume", train_objective="fixmatch"), "augments 2D images"),
    (dict(federation_sites="a;b", federation_min_sites=3), "more than the 2 site"),
])
def test_combinations_that_cannot_work_are_refused(kw, says):
    with pytest.raises(SettingsError, match=says):
        Settings(**kw)


def test_the_registries_name_exactly_the_values_the_settings_allow():
    assert set(STRATEGIES) == set(allowed(StrategyName))
    assert set(OBJECTIVES) == set(allowed(ObjectiveName))
    assert set(OPTIMIZERS) == set(allowed(Optimizer))
    assert set(MODEL_NAMES) == set(allowed(ImageModel)) | set(allowed(TabularModel))
    assert FRAME_POLICIES == allowed(FramePolicy) and UPDATE_DTYPES == allowed(UpdateDtype)


def test_a_typo_in_a_scenario_or_an_override_stops_the_coordinator(tmp_path):
    site = tmp_path / "h1"
    site.mkdir()
    (site / "manifest.csv").write_text("patient_id,path,label\n")
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["h1"]\n[train]\noptimizer = "adam"\n')
    with pytest.raises(ScenarioError, match="train.optimizer = 'adam' is not allowed; choose one of adamw, sgd"):
        load_scenario(toml)
    toml.write_text('[federation]\nsites = ["h1"]\n')
    with pytest.raises(ScenarioError, match="strategy.name = 'fedsgd'"):
        load_scenario(toml, ["strategy.name=fedsgd"])


def test_a_site_refuses_a_bad_run_config_on_its_first_message():
    """The ClientApp reads Flower's run config through Settings.from_run_config too: its
    error reply names the setting."""
    grid = InProcessGrid(build_client_app(), 1, {"train.optimizer": "adam"})
    message = grid.create_message(RecordDict({"config": ConfigRecord()}), "query", 100, "")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert error_text(reply.error.reason) == "train.optimizer = 'adam' is not allowed; choose one of adamw, sgd"


def test_the_model_follows_the_data_and_a_model_that_cannot_read_it_is_refused():
    assert resolve_model("auto", tabular=True) == "logreg"
    assert resolve_model("auto", tabular=False) == "resnet_small"
    assert resolve_model("mlp", tabular=True) == "mlp"
    with pytest.raises(SettingsError, match="model.name = 'resnet_small' is an image model.*tabular rows"):
        resolve_model("resnet_small", tabular=True)
    with pytest.raises(SettingsError, match="model.name = 'logreg' is a tabular model.*images"):
        resolve_model("logreg", tabular=False)


def test_every_setting_is_documented():
    assert all(f.metadata.get("doc") for f in fields(Settings))


def test_the_committed_reference_is_the_generated_one():
    """docs/settings.md is `python -m fedir.config` output; regenerate it after a change."""
    committed = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert committed == reference_markdown()
    assert "| `train.optimizer` | `adamw` \\| `sgd` | `\"adamw\"` |" in committed
    assert "| `strategy.fraction-train` | float, in (0, 1] | `1.0` |" in committed
