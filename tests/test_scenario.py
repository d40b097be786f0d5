"""Scenario files and run settings: relative sites, overrides, and one-line errors."""

import pytest

from fedir.config import Settings, SettingsError
from fedir.simulations.scenario import ScenarioError, load_scenario


def _site(root, name):
    d = root / name
    d.mkdir(parents=True)
    (d / "manifest.csv").write_text("patient_id,path,label\n")
    return d


def test_sites_resolve_relative_to_the_toml_and_overrides_apply(tmp_path):
    _site(tmp_path / "data", "h1")
    _site(tmp_path / "data", "h2")
    toml = tmp_path / "conf" / "s.toml"
    toml.parent.mkdir()
    toml.write_text('[federation]\nsites = ["../data/h1", "../data/h2"]\n[train]\nrounds = 3\n')
    s = load_scenario(toml, ["train.rounds=7", "train.objective=supervised", "train.lr=0.5"])
    assert [p.rsplit("/", 1)[-1] for p in s.sites] == ["h1", "h2"]
    assert s.sites[0].startswith(str(tmp_path))
    assert (s.train_rounds, s.train_objective, s.train_lr) == (7, "supervised", 0.5)


def test_folder_without_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["empty"]\n')
    with pytest.raises(ScenarioError, match="no manifest.csv") as info:
        load_scenario(toml)
    assert "\n" not in str(info.value)


def test_unknown_and_mistyped_settings_are_refused(tmp_path):
    _site(tmp_path, "h1")
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["h1"]\n[train]\nrouns = 3\n')
    with pytest.raises(ScenarioError, match="train.rouns"):
        load_scenario(toml)
    with pytest.raises(SettingsError, match="train.rounds"):
        Settings.from_run_config({"train.rounds": "three"})


def test_settings_round_trip_through_the_flat_run_config():
    s = Settings(train_rounds=4, federation_sites="a;b")
    assert Settings.from_run_config(s.to_run_config()) == s
    assert s.sites == ["a", "b"]


def test_pyproject_run_config_declares_every_setting():
    """`flwr run .` reads pyproject's run config: it must name exactly the known settings."""
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    config = doc["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(Settings().to_run_config())
    Settings.from_run_config(config)
