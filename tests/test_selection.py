"""Model selection and early stopping on the validation patients (fedir.strategies.selection):
the round chosen follows validation and never test, the saved model is the chosen round's,
`train.patience` stops a study that finishes normally, and a resumed study keeps its choice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedir.config import Settings, SettingsError
from fedir.metrics import site_metrics
from fedir.protocol import VAL_KEY
from fedir.server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedir.server.runstore import GLOBAL_SITE, RunStore
from fedir.server.server_app import StudyRecorder
from fedir.server.summary import build_summary, selection_line
from fedir.simulations.inprocess import run_inprocess
from fedir.strategies.per_site import RoundReplies
from fedir.strategies.selection import EarlyStopped, Selection

SITES = ["site-a", "site-b"]


def _pooled(auc: float | None, per_patient_auc: float | None = None, *, patients: bool = True) -> dict:
    """A pooled validation entry as fedir.metrics.pooled_metrics shapes it (the keys read here)."""
    reasons = {} if auc is not None else {"auc": "no positive validation images at any site"}
    if not patients:
        return {"auc": auc, "per_patient": None, "reasons": {**reasons, "per_patient": "no per-patient metrics from a"}}
    return {"auc": auc, "per_patient": {"auc": per_patient_auc, "reasons": reasons}, "reasons": reasons}


# ---- the criterion alone ---------------------------------------------------------------


def test_the_highest_per_patient_auc_wins_and_a_tie_keeps_the_earlier_round():
    selection = Selection("val-auc")
    chosen = [selection.offer(r, _pooled(0.9, auc)) for r, auc in enumerate([0.6, 0.8, 0.8, 0.7], start=1)]
    assert chosen == [True, True, False, False]
    assert (selection.round, selection.score, selection.since_best) == (2, 0.8, 2)
    assert "per patient" in selection.describe() and "earliest round on ties" in selection.describe()


def test_per_image_when_per_patient_is_missing_and_the_unit_stays_fixed():
    selection = Selection("val-auc")
    selection.offer(1, _pooled(0.7, patients=False))
    # a later round with per-patient metrics is still compared per image: one unit per study
    selection.offer(2, _pooled(0.6, 0.99))
    assert (selection.round, selection.unit) == (1, "image")
    assert "per image (no per-patient validation metrics: no per-patient metrics from a)" in selection.describe()


def test_without_any_validation_auc_the_last_round_is_kept_and_said_so():
    selection = Selection("val-auc", patience=1)
    for server_round in (1, 2, 3):
        assert selection.offer(server_round, _pooled(None, None))
    assert selection.round == 3 and not selection.scored and selection.stop() is None
    assert selection.describe().startswith("val-auc: no evaluated round had a pooled validation AUC "
                                           "(no positive validation images at any site)")
    assert selection.offer(4, _pooled(0.5, 0.55)) and selection.round == 4 and selection.scored


def test_last_keeps_the_last_round_and_reports_its_validation_auc():
    selection = Selection("last")
    for server_round, auc in ((1, 0.9), (2, 0.6)):
        selection.offer(server_round, _pooled(0.5, auc))
    assert (selection.round, selection.score) == (2, 0.6)
    assert selection.describe().startswith("last: the last evaluated round")


def test_patience_counts_evaluated_rounds_without_improvement():
    selection = Selection("val-auc", patience=2)
    for server_round, auc in ((1, 0.7), (2, 0.8), (3, 0.79)):
        selection.offer(server_round, _pooled(0.5, auc))
        assert selection.stop() is None
    selection.offer(4, _pooled(0.5, 0.8))  # equal is not better
    stop = selection.stop()
    assert isinstance(stop, EarlyStopped) and stop.server_round == 4 and stop.kind == "early_stop"
    assert "not improved for 2 evaluated round(s)" in str(stop) and "round 2's, 0.8000" in str(stop)


def test_patience_needs_the_validation_criterion():
    with pytest.raises(SettingsError, match='needs eval.select = "val-auc"'):
        Settings(train_patience=2, eval_select="last")
    assert Settings().eval_select == "val-auc" and Settings().train_patience == 0


# ---- the recorder: selection reads validation only -------------------------------------


def _site(rng: np.random.Generator, separation: float, n_patients: int = 40) -> dict:
    """Real site aggregates (fedir.metrics.site_metrics) of scores that separate the classes
    by `separation`: two images per patient."""
    labels = np.repeat(np.arange(n_patients) % 2, 2)
    scores = 1 / (1 + np.exp(-(separation * (2 * labels - 1) + rng.normal(0, 1, labels.size))))
    patients = [f"p{i // 2}" for i in range(labels.size)]
    return site_metrics(labels, scores, patients, n_boot=20, seed=0)


def _record(tmp_path: Path, val_sep: list[float], test_sep: list[float], *, patience: int = 0,
            name: str = "run") -> tuple[StudyRecorder, RunStore]:
    """Feed a recorder one evaluation per round; the global model of round r is all r."""
    settings = Settings(federation_sites=";".join(SITES), train_rounds=len(val_sep), eval_bootstrap=20,
                        bias_bootstrap=20, train_patience=patience)
    store = RunStore(tmp_path / f"{name}.sqlite")
    store.start_run(name, "test", settings.to_run_config(), SITES)
    recorder = StudyRecorder(store, name, settings, rounds=len(val_sep))
    for server_round, (v, t) in enumerate(zip(val_sep, test_sep), start=1):
        rng = np.random.default_rng(server_round)
        recorder.on_train(RoundReplies(server_round, per_site={
            site: {"train_loss": 0.5, "label_counts": {0: 20, 1: 20}, "skipped": {}} for site in SITES}))
        per_site = {site: {**_site(rng, t), VAL_KEY: _site(rng, v)} for site in SITES}
        model = ArrayRecord({"w": Array(np.full(3, server_round, dtype=np.float32))})
        try:
            recorder.on_evaluate(RoundReplies(server_round, per_site=per_site, model=model))
        finally:
            if server_round == len(val_sep):
                recorder.progress.close()
    return recorder, store


def _aucs(store: RunStore, run_id: str, split: str) -> list[float]:
    return [store.site_metrics(run_id, r, split)[GLOBAL_SITE]["per_patient"]["auc"]
            for r in store.evaluated_rounds(run_id)]


def test_the_selected_round_follows_validation_not_test(tmp_path):
    recorder, store = _record(tmp_path, val_sep=[0.2, 2.0, 0.8, 0.5], test_sep=[0.2, 0.6, 2.5, 0.5])
    val, test = _aucs(store, "run", "val"), _aucs(store, "run", "test")
    assert int(np.argmax(val)) + 1 == 2 and int(np.argmax(test)) + 1 == 3  # the two peaks differ
    assert recorder.selection.round == 2 and recorder.selected is not None and recorder.selected[0] == 2
    assert recorder.selected_model is not None and float(recorder.selected_model["w"].numpy()[0]) == 2.0
    summary = build_summary(store, "run")
    assert summary["selection"]["round"] == summary["evaluated_round"] == 2
    assert summary["selection"]["score"] == pytest.approx(val[1]) and summary["selection"]["unit"] == "patient"
    # summary.json's test metrics are the selected round's, not the best test round's
    assert summary["global"]["per_patient"]["auc"] == pytest.approx(test[1])
    # the pooled validation entry is point estimates only: no bootstrap is spent on it
    pooled_val = store.site_metrics("run", 2, "val")[GLOBAL_SITE]
    assert pooled_val["auc_ci"] is None and "validation split" in pooled_val["reasons"]["auc_ci"]
    assert store.site_metrics("run", 2, "test")[GLOBAL_SITE]["auc_ci"] is not None
    store.close()


def test_changing_only_the_test_metrics_changes_no_selection(tmp_path):
    val = [0.2, 2.0, 0.8, 0.5]
    chosen = set()
    for i, test in enumerate(([0.2, 0.6, 2.5, 0.5], [3.0, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 3.0])):
        recorder, store = _record(tmp_path, val, test, name=f"r{i}")
        summary = build_summary(store, f"r{i}")
        chosen.add((recorder.selection.round, summary["selection"]["round"], summary["selection"]["score"]))
        store.close()
    assert len(chosen) == 1 and next(iter(chosen))[:2] == (2, 2)


def test_the_early_stop_is_raised_after_the_round_is_recorded(tmp_path):
    with pytest.raises(EarlyStopped, match="after round 3") as stop:
        _record(tmp_path, val_sep=[0.2, 2.0, 0.8, 0.5, 0.4], test_sep=[0.5] * 5, patience=1)
    assert stop.value.server_round == 3
    with RunStore(tmp_path / "run.sqlite") as store:
        assert store.evaluated_rounds("run") == [1, 2, 3] and store.bias("run", 3) is not None


# ---- whole studies, in process --------------------------------------------------------


def _federation(root: Path) -> str:
    """Three tabular sites whose training rows carry a feature that separates the classes
    there only (spurious: noise in the validation and test rows): the longer the study
    trains, the more the model leans on it, so the validation AUC peaks early."""
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    for name in names:
        rows = []
        for i in range(60):
            split = "train" if i < 30 else ("val" if i < 45 else "test")
            y = int(rng.random() < 0.5)
            spurious = (2 * y - 1) + rng.normal(0, 0.3) if split == "train" else rng.normal(0, 1)
            rows.append({"patient_id": f"{name}-{i}", "label": y, "split": split,
                         "clin_a": rng.normal(1.0 * y, 1.0), "clin_b": spurious})
        site = root / name
        site.mkdir(parents=True)
        with (site / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return ";".join(str(root / n) for n in names)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> str:
    return _federation(tmp_path_factory.mktemp("spurious"))


def _settings(sites: str, **kw) -> Settings:
    base = dict(federation_sites=sites, model_name="logreg", train_rounds=6, train_local_steps=10,
                train_batch_size=8, train_optimizer="sgd", train_lr=0.1, train_weight_decay=0.0,
                eval_bootstrap=10, bias_bootstrap=10)
    return Settings(**{**base, **kw})


def _val_aucs(out: Path, run_id: str) -> list[float]:
    with RunStore(out / "runs.sqlite") as store:
        return _aucs(store, run_id, "val")


def _same_model(a: Path, b: Path) -> bool:
    x, y = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_study_saves_the_validation_selected_model_not_the_last(sites, tmp_path):
    summary = run_inprocess(_settings(sites), tmp_path / "selected")
    val = _val_aucs(tmp_path / "selected", summary["run_id"])
    best = int(np.argmax(val)) + 1  # argmax: the earliest of equal maxima
    assert 1 < best < 6 and val[-1] < val[best - 1], val  # the federation does what it is built for
    selection = json.loads((tmp_path / "selected" / "summary.json").read_text())["selection"]
    assert selection["round"] == summary["evaluated_round"] == best
    assert selection["score"] == pytest.approx(val[best - 1]) and selection["stopped_early"] is False
    assert selection["criterion"].startswith("val-auc: the highest pooled validation AUC, per patient")
    # the study's verdict is the selected round's, redone with a final round's analyses
    with RunStore(tmp_path / "selected" / "runs.sqlite") as store:
        assert summary["bias"] == store.bias(summary["run_id"], best)
        # each site's validation aggregates are point estimates; its test ones carry CIs
        val_site = store.site_metrics(summary["run_id"], best, "val")["a"]
        assert val_site["auc"] is not None and val_site["auc_ci"] is None
        assert store.site_metrics(summary["run_id"], best, "test")["a"]["auc_ci"] is not None
    assert summary["bias"]["sensitivity"].get("reason") != "computed on the study's final round only"
    # model.pt is the selected round's global model: a study of `best` rounds ends with it
    run_inprocess(_settings(sites, train_rounds=best, eval_select="last"), tmp_path / "short")
    last = run_inprocess(_settings(sites, eval_select="last"), tmp_path / "last")
    assert _same_model(tmp_path / "selected", tmp_path / "short")
    assert not _same_model(tmp_path / "selected", tmp_path / "last")
    assert last["selection"]["round"] == last["evaluated_round"] == 6
    report = (tmp_path / "selected" / "report.html").read_text()
    assert f"selected round: <b>{best}</b>" in report and "shown, never used to choose" in report


def test_patience_stops_the_study_which_finishes_normally(sites, tmp_path):
    out = tmp_path / "stopped"
    summary = run_inprocess(_settings(sites, train_rounds=8, train_patience=2), out)
    val = _val_aucs(out, summary["run_id"])
    best = int(np.argmax(val)) + 1
    assert summary["status"] == "finished" and summary["rounds"] == best + 2 < 8
    assert summary["selection"]["round"] == summary["evaluated_round"] == best
    assert summary["selection"]["stopped_early"] is True
    notes = [n for n in summary["notes"] if n["kind"] == "early_stop"]
    assert len(notes) == 1 and notes[0]["round"] == best + 2
    assert notes[0]["message"] == summary["selection"]["stop_reason"]
    assert f"the best was round {best}'s" in notes[0]["message"]
    # the selected round's verdict is the final one (not the provisional verdict of round `best`)
    assert summary["bias"]["sensitivity"].get("reason") != "computed on the study's final round only"
    assert "early stop" in (out / "report.html").read_text()
    assert selection_line(summary).splitlines() == [
        f"Selected round {best} of {best + 2}: {summary['selection']['criterion']} "
        f"(validation AUC {summary['selection']['score']:.3f})", summary["selection"]["stop_reason"]]


def test_a_resumed_study_keeps_its_selection(sites, tmp_path, monkeypatch):
    """Killed in round 5, after the selected round: the choice, its score and its arrays
    come back from the checkpoint, and the study ends as the uninterrupted one did."""
    reference = run_inprocess(_settings(sites), tmp_path / "ref")
    assert reference["selection"]["round"] < 5
    original = StudyRecorder.on_train

    def crash_in_round_5(self, replies):
        if replies.server_round == 5:
            raise RuntimeError("coordinator lost in round 5")
        original(self, replies)

    monkeypatch.setattr(StudyRecorder, "on_train", crash_in_round_5)
    with pytest.raises(RuntimeError, match="round 5"):
        run_inprocess(_settings(sites), tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME).app_state["selection"]
    assert saved["round"] == reference["selection"]["round"] and saved["state"]["round"] == saved["round"]
    assert set(saved["model"]) == set(torch.load(tmp_path / "ref" / "model.pt"))
    monkeypatch.setattr(StudyRecorder, "on_train", original)
    resumed = run_inprocess(_settings(sites), tmp_path / "run")
    assert resumed["run_id"] != reference["run_id"] and resumed["status"] == "finished"
    assert resumed["selection"] == reference["selection"]
    assert resumed["global"] == reference["global"] and resumed["bias"] == reference["bias"]
    assert _same_model(tmp_path / "run", tmp_path / "ref")
