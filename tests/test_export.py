"""TensorBoard export: the ServerApp's recorder writes the same per-round, per-site numbers as runs.sqlite."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedir.config import Settings
from fedir.server.export import open_export
from fedir.server.runstore import RunStore
from fedir.server.server_app import StudyRecorder
from fedir.strategies.per_site import RoundReplies
from run_factory import site_eval

SITES = ["site-a", "site-b"]


def test_recorder_exports_each_rounds_metrics_to_tensorboard(tmp_path: Path) -> None:
    settings = Settings(monitor_tensorboard="tb", eval_bootstrap=20)
    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run("run-x", "test", settings.to_run_config(), SITES)
    export = open_export(settings, tmp_path, "run-x")
    recorder = StudyRecorder(store, "run-x", settings, rounds=2, export=export)
    rng = random.Random(0)
    for server_round in (1, 2):
        recorder.on_train(RoundReplies(server_round, per_site={
            site: {"train_loss": 0.5 / server_round, "label_counts": {0: 20, 1: 20}, "skipped": {}} for site in SITES}))
        per_site = {"site-a": site_eval(rng, 0.6 + 0.1 * server_round), "site-b": site_eval(rng, None)}
        recorder.on_evaluate(RoundReplies(server_round, per_site=per_site))
    recorder.progress.close()
    export.close()

    events = EventAccumulator(str(tmp_path / "tb" / "run-x"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for server_round in (1, 2):
        stored = store.site_metrics("run-x", server_round)
        for site in ["site-a", "global"]:
            for metric in ("auc", "accuracy", "sensitivity", "specificity"):
                assert scalars[f"{metric}/{site}"][server_round] == pytest.approx(stored[site][metric], abs=1e-6)
        assert scalars["auc_ci_low/site-a"][server_round] == pytest.approx(stored["site-a"]["auc_ci"][0], abs=1e-6)
        assert scalars["accuracy/site-b"][server_round] == pytest.approx(stored["site-b"]["accuracy"], abs=1e-6)
        assert scalars["train_loss/site-b"][server_round] == pytest.approx(0.5 / server_round)
        assert scalars["bias/alarm"][server_round] == float(store.bias("run-x", server_round)["alarm"])
    assert "auc/site-b" not in scalars  # a null AUC is not exported as a number; its reason stays in the store
    store.close()


def test_no_export_unless_asked(tmp_path: Path) -> None:
    assert open_export(Settings(), tmp_path, "run-x") is None
    assert not any(tmp_path.iterdir())
