"""TensorBoard and MLflow export: the ServerApp's recorder copies the same per-round, per-site numbers as runs.sqlite."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from run_factory import site_eval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedir.config import Settings
from fedir.server.export import mlflow_uri, open_exports
from fedir.server.runstore import RunStore
from fedir.server.server_app import StudyRecorder
from fedir.strategies.per_site import RoundReplies

SITES = ["site-a", "site-b"]


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_scalars(uri: str, run_name: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedir")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert run.info.status == "FINISHED" and run.data.params["train.seed"] == "0"
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


def test_recorder_exports_each_rounds_metrics(tmp_path: Path) -> None:
    settings = Settings(monitor_tensorboard="tb", monitor_mlflow="mlruns", eval_bootstrap=20)
    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run("run-x", "test", settings.to_run_config(), SITES)
    exports = open_exports(settings, tmp_path, "run-x")
    recorder = StudyRecorder(store, "run-x", settings, rounds=2, exports=exports)
    rng = random.Random(0)
    for server_round in (1, 2):
        recorder.on_train(RoundReplies(server_round, per_site={
            site: {"train_loss": 0.5 / server_round, "label_counts": {0: 20, 1: 20}, "skipped": {}} for site in SITES}))
        per_site = {"site-a": site_eval(rng, 0.6 + 0.1 * server_round), "site-b": site_eval(rng, None)}
        recorder.on_evaluate(RoundReplies(server_round, per_site=per_site))
    recorder.progress.close()
    for export in exports:
        export.close()

    for scalars in (tensorboard_scalars(tmp_path / "tb" / "run-x"),
                    mlflow_scalars(mlflow_uri("mlruns", tmp_path), "run-x")):
        check_against_store(scalars, store)
    store.close()


def check_against_store(scalars: dict[str, dict[int, float]], store: RunStore) -> None:
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


def test_no_export_unless_asked(tmp_path: Path) -> None:
    assert open_exports(Settings(), tmp_path, "run-x") == []
    assert not any(tmp_path.iterdir())


def test_mlflow_target_is_a_uri_or_a_folder(tmp_path: Path) -> None:
    assert mlflow_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert mlflow_uri("sqlite:///x/m.db", tmp_path) == "sqlite:///x/m.db"
    assert mlflow_uri("mlruns", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()
