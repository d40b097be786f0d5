"""The UCI Heart Disease import (FLamby's preprocessing and split) and tabular studies
through fedir's ServerApp logic and ClientApp: strategies, arms, federated standardisation."""

import json

import numpy as np
import pytest
import torch

from fedir.cli import main
from fedir.client.tabular import read_tabular_site
from fedir.config import Settings
from fedir.models import build_model
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.uci_heart import CENTRES, default_source, import_heart

SOURCE = default_source()
pytestmark = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"UCI heart data not at {SOURCE}")


@pytest.fixture(scope="module")
def heart(tmp_path_factory):
    out = tmp_path_factory.mktemp("heart")
    import_heart(out)
    return out


def test_import_follows_flambys_preprocessing_and_split(heart, tmp_path, monkeypatch, capsys):
    sizes = {c: (len(s.train.patients), len(s.test.patients))
             for c in CENTRES for s in [read_tabular_site(heart / c)]}
    assert sizes == {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}
    swiss = read_tabular_site(heart / "switzerland")
    assert swiss.train.x.shape[1] == 13 and swiss.dropped_missing == 0
    assert swiss.train.y.tolist() == [1] * 30  # every Swiss training patient is positive
    assert not any(f.startswith(("clin_slope", "clin_ca", "clin_thal_", "clin_cp_1", "clin_restecg_0"))
                   for f in swiss.features)
    # the command line, with the source from $FEDIR_DATA
    monkeypatch.setenv("FEDIR_DATA", str(SOURCE.parent))
    assert main(["data", "import", "heart", "--out", str(tmp_path / "h")]) == 0
    assert "199 train, 104 test" in capsys.readouterr().out
    assert (tmp_path / "h" / "va" / "manifest.csv").read_text() == (heart / "va" / "manifest.csv").read_text()
    monkeypatch.setenv("FEDIR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_heart(tmp_path / "x")


def _settings(heart, **kw):
    base = dict(federation_sites=";".join(str(heart / c) for c in CENTRES), model_name="logreg",
                train_rounds=3, train_local_steps=30, train_batch_size=4, train_optimizer="sgd",
                train_lr=0.02, train_weight_decay=0.0, eval_bootstrap=20)
    return Settings(**{**base, **kw})


def _accuracy(summary):
    return np.mean([v["accuracy"] for v in summary["per_site"].values()])


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_tabular_federation_learns_with_federated_standardisation(heart, tmp_path, strategy):
    summary = run_inprocess(_settings(heart, strategy_name=strategy), tmp_path)
    assert set(summary["per_site"]) == set(CENTRES)
    assert _accuracy(summary) > 0.7
    assert summary["bias"]["alarm"]  # Switzerland: 30 of 30 training patients positive


def test_fedprox_mu_reaches_the_clients_loss(heart, tmp_path):
    start = build_model("logreg", seed=0, n_features=13).state_dict()

    def distance(mu):
        run_inprocess(_settings(heart, strategy_name="fedprox", strategy_proximal_mu=mu,
                                train_rounds=1), tmp_path / str(mu))
        final = torch.load(tmp_path / str(mu) / "model.pt")
        return sum(float((final[k] - start[k]).pow(2).sum()) for k in start)

    assert distance(30.0) < 0.2 * distance(0.0)


def test_local_and_pooled_arms(heart, tmp_path):
    local = run_inprocess(_settings(heart, federation_arm="local", data_standardise="site"), tmp_path / "l")
    # alone, Switzerland's model learns its prevalence: every test patient called positive
    swiss = local["per_site"]["switzerland"]
    assert swiss["sensitivity"] == 1.0 and swiss["specificity"] == 0.0
    pooled = run_inprocess(_settings(heart, federation_arm="pooled"), tmp_path / "p")
    assert _accuracy(pooled) > 0.7 and pooled["per_site"]["switzerland"]["specificity"] > 0
    with open(tmp_path / "p" / "summary.json") as fh:
        assert json.load(fh)["sites"]


@pytest.mark.slow
def test_fedir_simulate_runs_a_tabular_federation_on_flowers_engine(heart, tmp_path):
    """The same apps on Ray: the feature query, then rounds, recognised from the manifests."""
    scenario = tmp_path / "heart.toml"
    sites = ", ".join(f'"{heart / c}"' for c in CENTRES)
    scenario.write_text(f"""
[federation]
sites = [{sites}]
[strategy]
name = "fedyogi"
[train]
rounds = 2
local-steps = 20
batch-size = 4
optimizer = "sgd"
lr = 0.02
[model]
name = "mlp"
[eval]
bootstrap = 20
""")
    assert main(["simulate", str(scenario), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and set(summary["per_site"]) == set(CENTRES)
    assert summary["global"]["accuracy"] > 0.6


def test_float16_updates_halve_the_weights_bytes_and_still_learn(heart, tmp_path):
    full = run_inprocess(_settings(heart, model_name="mlp"), tmp_path / "32")
    half = run_inprocess(_settings(heart, model_name="mlp", train_update_dtype="float16"), tmp_path / "16")
    # each array also carries a 128-byte .npy header, so a small MLP saves a little under half
    assert half["upload_bytes"] < 0.65 * full["upload_bytes"]
    assert _accuracy(half) > 0.7
    assert torch.load(tmp_path / "16" / "model.pt")["0.weight"].dtype == torch.float32


def test_compare_scores_tabular_sites_with_the_model_they_trained(heart, tmp_path):
    """`fedir compare` on tabular sites (data.inputs auto): the re-scored federated model is the
    logistic model the sites trained, so the paired AUC equals what each site reported."""
    from fedir.simulations.compare import compare

    settings = _settings(heart, train_rounds=2)
    result = compare(settings, tmp_path, seeds=[0], arms=["federated", "local"], progress=lambda _: None)
    reported = json.loads((tmp_path / "seed-0" / "federated" / "summary.json").read_text())["per_site"]
    pairs = result["questions"]["0"]["federated_vs_local"]
    assert set(pairs) == set(CENTRES)
    for site, pair in pairs.items():
        assert pair["auc_a"] == pytest.approx(reported[site]["per_patient"]["auc"])
