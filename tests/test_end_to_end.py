"""The whole path through Flower's simulation engine: synthetic DICOM sites -> Flower rounds
-> per-site evaluation -> run store -> summary.json, report.html and the bias verdict."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from fedir.models import build_model
from fedir.simulations.scenario import load_scenario
from fedir.simulations.simulate import simulate
from fedir.simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"run_id", "scenario", "rounds", "sites", "global", "per_site", "bias"}


def _scenario(tmp_path, fed, sites, rounds=2, name="s.toml"):
    toml = tmp_path / name
    listed = ", ".join(f'"{fed.name}/site-{i}"' for i in range(sites))
    toml.write_text(
        f"[federation]\nsites = [{listed}]\n"
        f"[train]\nrounds = {rounds}\nlocal-epochs = 1\nbatch-size = 16\n"
        "[model]\nimage-size = 32\n[eval]\nbootstrap = 100\n"
    )
    return toml


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    fed = tmp / "fed"
    generate_federation(fed, sites=3, patients=40, seed=11, image_size=64, progress=False)
    toml = _scenario(tmp, fed, 3)
    out = tmp / "run"
    summary = simulate(load_scenario(toml), out, scenario=str(toml))
    return out, summary


def test_summary_has_the_contract_keys_and_every_site(clean_run):
    out, summary = clean_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["rounds"] == 2
    assert summary["sites"] == ["site-0", "site-1", "site-2"]
    assert set(summary["per_site"]) == set(summary["sites"])
    for site, m in summary["per_site"].items():
        assert m["n_test"] > 0, site
        for key in ("auc", "auc_ci", "accuracy"):
            assert key in m
        if m["auc"] is None:
            assert m["reasons"].get("auc"), site
        else:
            assert 0.0 <= m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] <= 1.0
    assert summary["global"]["auc"] is not None
    assert set(summary["bias"]) >= {"alarm", "reasons", "tests"}


def test_run_store_has_rows_for_every_round_and_site(clean_run):
    out, summary = clean_run
    con = sqlite3.connect(out / "runs.sqlite")
    rows = con.execute(
        "SELECT round, site FROM metrics WHERE split = 'test' AND metric = 'auc'"
    ).fetchall()
    con.close()
    assert {(r, s) for r, s in rows} >= {(r, s) for r in (1, 2) for s in summary["sites"] + ["global"]}
    assert (out / "report.html").stat().st_size > 1000
    saved = torch.load(out / "model.pt", weights_only=True)  # averaged, saved in the model's own dtypes
    assert {k: t.dtype for k, t in saved.items()} == {k: t.dtype for k, t in build_model("resnet_small").state_dict().items()}


def test_clean_federation_raises_no_alarm(clean_run):
    _, summary = clean_run
    assert summary["bias"]["alarm"] is False, summary["bias"]["reasons"]


def test_confounded_federation_raises_the_alarm_naming_the_site(tmp_path):
    fed = tmp_path / "fed"
    generate_federation(fed, sites=3, patients=40, seed=12, confound=1.0, image_size=64, progress=False)
    toml = _scenario(tmp_path, fed, 3, rounds=1)
    summary = simulate(load_scenario(toml), tmp_path / "run", scenario=str(toml))
    bias = summary["bias"]
    assert bias["alarm"] is True
    assoc = bias["tests"]["site_label_association"]
    assert assoc["alarm"] is True and "site-0" in assoc["sites"]
    assert any("site-0" in r for r in bias["reasons"])


def test_simulate_on_a_folder_without_manifest_is_one_line(tmp_path):
    (tmp_path / "nosite").mkdir()
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["nosite"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fedir.cli", "simulate", str(toml), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.csv" in lines[0], proc.stderr
