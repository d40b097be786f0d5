"""Personalised arms (train.personalise): a local intercept that never leaves the site, and
local fine-tuning before evaluation that leaves the federation itself unchanged."""

import csv
import sqlite3

import numpy as np
import pytest
import torch

from fedir.client.client_app import build_client_app
from fedir.client.kept_state import STATE_KEY
from fedir.config import Settings, SettingsError
from fedir.models import build_model, intercept_key, kept_keys
from fedir.server.server_app import run_study, shared_arrays
from fedir.simulations.inprocess import InProcessGrid, run_inprocess

PREVALENCE = {"high": 0.9, "mid": 0.5, "low": 0.1}


def _federation(root):
    """Three tabular sites that differ in prevalence; one weakly informative feature."""
    rng = np.random.default_rng(0)
    for name, prevalence in PREVALENCE.items():
        rows = []
        for i in range(80):
            y = int(rng.random() < prevalence)
            rows.append({"patient_id": f"{name}-{i}", "label": y, "split": "test" if i < 25 else "train",
                         "clin_a": rng.normal(0.8 * y, 1.0), "clin_b": rng.normal(0.0, 1.0)})
        site = root / name
        site.mkdir(parents=True)
        with (site / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return ";".join(str(root / n) for n in PREVALENCE)


def _settings(sites, **kw):
    base = dict(federation_sites=sites, model_name="logreg", train_rounds=3, train_local_steps=30,
                train_batch_size=8, train_optimizer="sgd", train_lr=0.05, train_weight_decay=0.0,
                eval_bootstrap=10)
    return Settings(**{**base, **kw})


def test_the_intercept_is_the_output_layers_bias():
    assert intercept_key(build_model("logreg", n_features=3)) == "bias"
    assert intercept_key(build_model("mlp", n_features=3)) == "2.bias"
    assert intercept_key(build_model("resnet_small")) == "fc.bias"
    model = build_model("resnet_small")
    assert kept_keys(model, Settings(train_personalise="intercept")) == {"fc.bias"}
    both = kept_keys(model, Settings(train_personalise="intercept", train_fedbn=True))
    assert "fc.bias" in both and "bn1.running_mean" in both
    assert "fc.bias" not in shared_arrays(model, Settings(train_personalise="intercept"))
    assert "fc.bias" in shared_arrays(model, Settings())
    assert kept_keys(model, Settings()) == set()


def test_bad_values_and_non_federated_arms_are_refused():
    with pytest.raises(SettingsError, match="choose one of"):
        Settings(train_personalise="bias")
    with pytest.raises(SettingsError, match="federated"):
        Settings(train_personalise="finetune", federation_arm="local")


def test_local_intercept_never_leaves_the_site_and_learns_its_prevalence(tmp_path):
    sites = _federation(tmp_path / "fed")
    settings = _settings(sites, train_personalise="intercept", strategy_name="fedadam")
    grid = InProcessGrid(build_client_app(settings), 3, settings.to_run_config())
    sent_keys: list[set[str]] = []
    push = grid.push_messages

    def watching(messages):
        messages = list(messages)
        for m in messages:
            if "arrays" in m.content.array_records:
                sent_keys.append(set(m.content.array_records["arrays"].keys()))
        return push(messages)

    grid.push_messages = watching
    replies: list[set[str]] = []
    app = grid.client_app

    def replying(msg, ctx):
        reply = app(msg, ctx)
        if not reply.has_error() and "arrays" in reply.content.array_records:
            replies.append(set(reply.content.array_records["arrays"].keys()))
        return reply

    grid.client_app = replying
    run_study(grid, settings, tmp_path / "run", scenario="test")  # FedAdam: same keys every round
    assert sent_keys and all(k == {"weight"} for k in sent_keys)
    assert replies and all(k == {"weight"} for k in replies)
    with sqlite3.connect(tmp_path / "run" / "runs.sqlite") as db:
        assert not db.execute("SELECT * FROM notes WHERE kind IN ('rejected', 'missing')").fetchall()
    assert set(torch.load(tmp_path / "run" / "model.pt")) == {"weight"}
    # each site's own intercept: the high-prevalence site leans positive, the low one negative
    logit = {}
    for i, name in enumerate(PREVALENCE):
        bias = grid.contexts[100 + i].state.array_records[STATE_KEY].to_torch_state_dict()["bias"]
        logit[name] = float(bias[1] - bias[0])
    assert logit["high"] > logit["mid"] > logit["low"], logit


def test_finetuning_changes_what_sites_score_but_not_the_federation(tmp_path):
    sites = _federation(tmp_path / "fed")
    plain = run_inprocess(_settings(sites), tmp_path / "plain")
    tuned = run_inprocess(_settings(sites, train_personalise="finetune"), tmp_path / "tuned")
    a, b = torch.load(tmp_path / "plain" / "model.pt"), torch.load(tmp_path / "tuned" / "model.pt")
    assert set(a) == set(b) == {"weight", "bias"}
    # the global model is the same (to float rounding: two plain runs differ by ~1e-8 too)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), (a, b)
    # fine-tuned on their own rows, the skewed sites call more of their majority class
    spec_plain, spec_tuned = (s["per_site"]["high"]["specificity"] for s in (plain, tuned))
    sens_plain, sens_tuned = (s["per_site"]["low"]["sensitivity"] for s in (plain, tuned))
    assert spec_tuned <= spec_plain and sens_tuned <= sens_plain
    assert (spec_tuned, sens_tuned) != (spec_plain, sens_plain)
