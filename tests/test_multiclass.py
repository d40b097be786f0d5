"""Multi-class classification (task.classes = K > 2): the setting, the labels, the model."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

from fedir.client.manifest import ManifestError
from fedir.client.tabular import read_tabular_site
from fedir.config import Settings, SettingsError
from fedir.models import build_model
from fedir.protocol import decode_evaluation, encode_evaluation
from fedir.tasks import task_of
from fedir.tasks.multiclass_metrics import pooled_multiclass_metrics, site_multiclass_metrics


def _write(site, rows):
    site.mkdir(parents=True, exist_ok=True)
    with (site / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return site


def test_task_classes_defaults_to_two_and_refuses_fewer_or_a_binary_only_setting():
    assert Settings().task_classes == 2
    assert Settings.from_run_config({"task.classes": 3}).task_classes == 3
    with pytest.raises(SettingsError, match="task.classes"):
        Settings.from_run_config({"task.classes": 1})
    with pytest.raises(SettingsError, match="task.classes = 3 applies to"):
        Settings.from_run_config({"task.kind": "survival", "task.classes": 3})
    with pytest.raises(SettingsError, match="bias.cross-site"):
        Settings.from_run_config({"task.classes": 3, "bias.cross-site": True})


def test_labels_outside_0_to_k_minus_1_are_refused_with_their_row(tmp_path):
    rows = [{"patient_id": f"p{i}", "label": i % 3, "clin_a": i} for i in range(9)]
    site = read_tabular_site(_write(tmp_path / "ok", rows), num_classes=3)
    assert set(site.train.y.tolist()) | set(site.test.y.tolist()) | set(site.val.y.tolist()) <= {0, 1, 2}
    with pytest.raises(ManifestError, match=r"row 4.*outside the task's classes 0\.\.1"):
        read_tabular_site(_write(tmp_path / "binary", rows), num_classes=2)  # row 4: p2, label 2
    rows[5]["label"] = 3
    with pytest.raises(ManifestError, match=r"row 7.*outside the task's classes 0\.\.2") as info:
        read_tabular_site(_write(tmp_path / "bad", rows), num_classes=3)
    assert "3" not in info.value.public.replace("0..2", "")  # the value stays in the site's log


def test_the_model_has_k_outputs_and_the_score_is_the_probability_vector():
    task = task_of("classification")
    model = build_model("logreg", n_features=4, n_outputs=task.n_outputs(3))
    scores = task.score(model(torch.randn(5, 4)))
    assert scores.shape == (5, 3)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(5))
    binary = task.score(torch.tensor([[0.0, 1.0]]))
    assert binary.shape == (1,)  # K = 2: the positive-class probability, as before


def _case(seed=0, n_patients=60, k=3, images=2, skill=1.5):
    """A small hand-made federation site: patients with `images` images each, labels per patient."""
    rng = np.random.default_rng(seed)
    y_patient = np.arange(n_patients) % k
    y = np.repeat(y_patient, images)
    logits = rng.normal(size=(y.size, k))
    logits[np.arange(y.size), y] += skill
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    patients = [f"{seed}-p{i}" for i in np.repeat(np.arange(n_patients), images)]
    return y, p, patients


def test_site_metrics_match_sklearn_on_a_hand_made_case():
    # three patients per class, one image each, probabilities written out by hand
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    p = np.array([[.7, .2, .1], [.5, .4, .1], [.2, .3, .5],
                  [.3, .6, .1], [.4, .5, .1], [.6, .3, .1],
                  [.1, .1, .8], [.2, .5, .3], [.3, .3, .4]])
    out = site_multiclass_metrics(y, p, [f"p{i}" for i in range(9)], n_boot=200, seed=1, bins=20)
    assert out["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert out["confusion"] == confusion_matrix(y, p.argmax(1)).tolist()
    assert out["sensitivity_per_class"] == pytest.approx(recall_score(y, p.argmax(1), average=None).tolist())
    for c in range(3):
        assert out["auc_per_class"][c] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert sum(out["hist_class"][c]) == 3 and sum(out["hist_rest"][c]) == 6
    for name in ("auc", "balanced_accuracy", "accuracy"):
        lo, hi = out[f"{name}_ci"]
        assert lo <= out[name] <= hi
    # one row per patient already: the per-patient set equals the image set
    assert out["per_patient"]["auc"] == pytest.approx(out["auc"])


def test_per_patient_metrics_use_the_mean_probability_vector():
    y, p, patients = _case(images=3)
    out = site_multiclass_metrics(y, p, patients, n_boot=100, bins=20)
    mean = p.reshape(-1, 3, 3).mean(axis=1)
    y_patient = y[::3]
    per = out["per_patient"]
    assert per["n"] == per["n_patients"] == 60
    assert per["auc"] == pytest.approx(roc_auc_score(y_patient, mean, multi_class="ovr"))
    assert per["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_patient, mean.argmax(1)))
    assert per["auc_ci"][0] < per["auc"] < per["auc_ci"][1]
    mixed = site_multiclass_metrics(np.array([0, 1, 2, 2]), p[:4], ["a", "a", "b", "c"], n_boot=0)
    assert mixed["per_patient"] is None and "different labels" in mixed["reasons"]["per_patient"]


def test_a_missing_class_gives_no_macro_auc_with_a_reason():
    y, p, patients = _case()
    keep = y != 2
    out = site_multiclass_metrics(y[keep], p[keep], [q for q, k in zip(patients, keep) if k], n_boot=50)
    assert out["auc"] is None and "class(es) 2 absent" in out["reasons"]["auc"]
    assert out["balanced_accuracy"] is not None and out["sensitivity_per_class"][2] is None


def test_pooled_balanced_accuracy_is_exact_and_the_macro_auc_within_its_bound():
    sites = {f"s{i}": _case(seed=i, n_patients=40 + 10 * i, skill=1.0 + i) for i in range(3)}
    per_site = {name: site_multiclass_metrics(*case, n_boot=0, bins=20) for name, case in sites.items()}
    pooled = pooled_multiclass_metrics(per_site, n_boot=200)
    y = np.concatenate([c[0] for c in sites.values()])
    p = np.concatenate([c[1] for c in sites.values()])
    assert pooled["balanced_accuracy"] == balanced_accuracy_score(y, p.argmax(1))  # exact, not approximate
    assert pooled["confusion"] == confusion_matrix(y, p.argmax(1)).tolist()
    exact = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert 0 < pooled["auc_binning_error"] < 0.05
    assert abs(pooled["auc"] - exact) <= pooled["auc_binning_error"]
    for name in ("auc", "balanced_accuracy", "accuracy"):
        lo, hi = pooled[f"{name}_ci"]
        assert lo < pooled[name] < hi
    assert pooled["per_patient"]["n"] == sum(c[0].size for c in sites.values()) // 2


def test_a_multiclass_evaluation_crosses_the_protocol_unchanged():
    y, p, patients = _case(images=2)
    m = site_multiclass_metrics(y, p, patients, n_boot=50, bins=20)
    name, back = decode_evaluation(encode_evaluation("siteA", m, None, m))
    assert name == "siteA"
    for key in ("n", "classes", "auc", "auc_ci", "balanced_accuracy_ci", "confusion", "hist_rest", "hist_class",
                "auc_per_class", "sensitivity_per_class", "reasons"):
        assert back[key] == m[key] and back["per_patient"][key] == m["per_patient"][key]
        assert back["val"][key] == m[key]


def _federation(tmp_path, k=3, sites=3, n=90):
    """Tabular sites whose label (0..k-1) follows clin_a, with site-dependent prevalence."""
    rng = np.random.default_rng(0)
    out = []
    for s in range(sites):
        site = tmp_path / f"site-{s}"
        site.mkdir()
        x = rng.normal(size=(n, 2))
        y = np.digitize(x[:, 0] + 0.5 * rng.normal(size=n) + 0.3 * s, [-0.5, 0.5])  # 0..2
        rows = [f"p{s}-{i},{y[i]},{x[i, 0]:.4f},{x[i, 1]:.4f}" for i in range(n)]
        (site / "manifest.csv").write_text("patient_id,label,clin_a,clin_b\n" + "\n".join(rows) + "\n")
        out.append(str(site))
    return out


def test_a_three_class_study_runs_end_to_end_with_every_metric_per_site(tmp_path):
    from fedir.simulations.inprocess import run_inprocess

    settings = Settings(task_classes=3, federation_sites=";".join(_federation(tmp_path)), train_rounds=2,
                        train_local_steps=20, train_batch_size=8, train_lr=0.1, eval_bootstrap=50,
                        data_val_fraction=0.25, data_test_fraction=0.3)
    summary = run_inprocess(settings, tmp_path / "run")
    assert summary["selection"]["score"] is not None
    for entry in [summary["global"], *summary["per_site"].values()]:
        for name in ("auc", "balanced_accuracy"):
            assert entry[name] is not None and entry[f"{name}_ci"] is not None, (name, entry["reasons"])
        assert entry["classes"] == 3 and len(entry["confusion"]) == 3 and len(entry["sensitivity_per_class"]) == 3
        assert entry["per_patient"]["balanced_accuracy"] is not None
    assert summary["global"]["auc"] > 0.7  # the label follows clin_a
    assert summary["threshold"]["value"] is None and "argmax" in summary["threshold"]["reason"]
    bias = summary["bias"]
    assert bias["alarm"] in (True, False)  # the verdict was computed
    association = bias["tests"]["site_label_association"]
    assert association["computable"] and association["dof"] == 2 * 2  # (3 classes - 1) x (3 sites - 1)
    assert all(len(row) == 3 for row in association["table"].values())
    assert bias["tests"]["pooled_vs_within_auc"]["computable"]
    assert set(bias["tests"]["pooled_vs_within_auc"]["per_class"]) == {"0", "1", "2"}
    assert bias["tests"]["auc_heterogeneity"]["computable"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "balanced accuracy" in report and "predicted 2" in report
    from fedir.server.dashboard_state import overview, run_detail
    from fedir.server.summary import format_site_table

    table = format_site_table(summary)
    assert "balanced accuracy" in table and "No decision threshold" in table
    source = overview(tmp_path / "run")["runs"][0]
    detail = run_detail(tmp_path / "run", source["source"], source["run_id"])
    assert detail["threshold"].startswith("No decision threshold")
    assert all(row["patient_balanced_accuracy"] != "n/a" for row in detail["table"])


def test_the_label_by_site_association_reads_a_k_by_sites_table_and_names_the_driving_class():
    from fedir.strategies.bias import site_label_association

    balanced = {f"s{i}": {0: 30, 1: 30, 2: 30} for i in range(3)}
    assert not site_label_association(balanced)["alarm"]
    confounded = {**balanced, "s2": {0: 30, 1: 30, 2: 200}}  # class 2 is over-represented at s2
    out = site_label_association(confounded)
    assert out["alarm"] and out["dof"] == 4 and out["class"] == 2 and out["sites"][0] == "s2"
    assert "class 2 prevalence" in out["reason"] and set(out["residuals_per_class"]["s2"]) == {"0", "1", "2"}
    assert "class" not in site_label_association({"a": {0: 50, 1: 5}, "b": {0: 5, 1: 50}})  # binary: as before


def test_data_check_reads_k_classes_and_the_data_card_counts_each_class(tmp_path, capsys):
    from fedir.cli import main
    from fedir.client.manifest import write_manifest
    from tests.dicom_factory import write_dicom

    rows = []
    for i in range(9):
        write_dicom(tmp_path / f"img/{i}.dcm", np.full((2, 8, 8), i + 1))
        rows.append({"patient_id": f"P{i}", "path": f"img/{i}.dcm", "label": i % 3})
    write_manifest(tmp_path, rows)
    assert main(["data", "check", str(tmp_path)]) == 2  # binary by default: label 2 refused with its row
    assert "row 4" in capsys.readouterr().err
    card_path = tmp_path / "card.json"
    assert main(["data", "check", str(tmp_path), "--classes", "3", "--card", str(card_path), "--k", "1"]) == 0
    assert "labelled patients per class: 0: 3, 1: 3, 2: 3" in capsys.readouterr().out
    labels = json.loads(card_path.read_text())["labels"]
    assert labels["per_class"]["values"] == {"0": 3, "1": 3, "2": 3} and labels["prevalence"] is None


@pytest.mark.parametrize("name", ["fixmatch", "mean_teacher"])
def test_the_semi_supervised_objectives_train_a_three_class_model(name):
    """FixMatch's pseudo-labels and the mean teacher's consistency are over the K-class
    softmax: with 3 classes the loss falls over a few steps and FixMatch's unlabelled term
    is the cross-entropy of the 3 logits against their argmax."""
    from torch import nn

    from fedir.client.objectives import FixMatch, ObjectiveParams, build_objective

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = torch.randn(24, 1, 8, 8, generator=g) + 3 * y.float().view(-1, 1, 1, 1)  # the class shifts the mean
    u = torch.randn(24, 1, 8, 8, generator=g) + 3 * (torch.arange(24) % 3).float().view(-1, 1, 1, 1)
    objective = build_objective(name, ObjectiveParams(threshold=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(80):
        optimiser.zero_grad()
        loss = objective.loss(model, x, y, u)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if name == "fixmatch":
        same = lambda t, g: t  # noqa: E731
        model.eval()
        _, unlabelled, mask = FixMatch(ObjectiveParams(threshold=0.0), weak=same, strong=same).terms(model, x, y, u)
        logits = model(u)
        assert mask.all() and logits.shape == (24, 3)
        torch.testing.assert_close(unlabelled, nn.functional.cross_entropy(logits, logits.argmax(1)))


def test_the_synthetic_stenosis_grades_narrow_the_trunk_in_their_range():
    from fedir.simulations.synthetic import GRADE_SEVERITY, _add_lesions, _vessel_tree

    tightest = {}
    for grade in (0, 1, 2):
        values = []
        for seed in range(40):
            rng = np.random.default_rng(seed)
            vessels = _vessel_tree(rng, 128)
            before = [v.radius.copy() for v in vessels]
            _add_lesions(rng, vessels, grade, graded=True)
            values.append(max(float(1 - (v.radius / r0).min()) for v, r0 in zip(vessels, before) if v.level == 0))
        tightest[grade] = np.array(values)
    assert tightest[0].max() < 0.55  # mild irregularities only
    for grade, (low, high) in GRADE_SEVERITY.items():
        assert (tightest[grade] >= low - 1e-6).all() and (tightest[grade] <= high + 0.02).all()
    assert np.median(tightest[2]) > np.median(tightest[1]) + 0.15


def test_data_synth_grades_writes_three_class_labels(tmp_path):
    from fedir.cli import main

    assert main(["data", "synth", str(tmp_path), "--sites", "1", "--patients", "12", "--image-size", "16",
                 "--unlabelled", "0", "--grades"]) == 0
    with (tmp_path / "site-0" / "manifest.csv").open() as fh:
        labels = {row["patient_id"]: int(row["label"]) for row in csv.DictReader(fh)}
    assert set(labels.values()) <= {0, 1, 2} and 2 in labels.values() and 0 in labels.values()
    info = json.loads((tmp_path / "federation.json").read_text())
    assert info["parameters"]["grades"] is True
    assert info["sites"]["site-0"]["positive_patients"] == sum(v > 0 for v in labels.values())


@pytest.mark.slow
def test_a_three_class_imaging_study_on_the_synthetic_grades(tmp_path):
    """The imaging path with K = 3: the synthetic stenosis grades, the image network with
    3 outputs, per-patient metrics (patients have 2-4 images), the embedding moments per
    class and the data card's per-class counts."""
    from fedir.simulations.inprocess import run_inprocess
    from fedir.simulations.synthetic import generate_federation

    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=60, seed=3, image_size=32, unlabelled_fraction=0.0, grades=True,
                        progress=False)
    settings = Settings(task_classes=3, federation_sites=f"{fed}/site-0;{fed}/site-1", train_rounds=2,
                        train_local_steps=4, train_batch_size=8, model_image_size=32, eval_bootstrap=30,
                        data_val_fraction=0.2, data_test_fraction=0.4)
    summary = run_inprocess(settings, tmp_path / "run")
    for entry in [summary["global"], *summary["per_site"].values()]:
        patient = entry["per_patient"]
        assert patient is not None and patient["n_test"] < entry["n_test"]  # one row per patient
        assert patient["auc"] is not None and patient["balanced_accuracy"] is not None
        assert np.array(patient["confusion"]).shape == (3, 3)
    assert summary["bias"]["tests"]["site_separability"]["computable"] in (True, False)


def _site_of(rng, labels, shift, informative=True):
    """One site's probabilities: informative (the true class favoured) or noise, with
    every patient's class-2 logit shifted by `shift` (what a site marker would do)."""
    logits = rng.normal(size=(labels.size, 3))
    if informative:
        logits[np.arange(labels.size), labels] += 1.5
    logits[:, 2] += shift
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return site_multiclass_metrics(labels, p, [f"{shift}-{i}" for i in range(labels.size)], n_boot=0, bins=20)


def test_the_per_class_gap_alarms_when_the_model_ranks_a_hospital_for_one_class():
    from fedir.strategies.multiclass_bias import multiclass_pooled_vs_within_auc

    rng = np.random.default_rng(0)
    clean = {f"s{i}": _site_of(rng, np.arange(150) % 3, 0.0) for i in range(3)}
    out = multiclass_pooled_vs_within_auc(clean, n_boot=200)
    assert out["computable"] and not out["alarm"] and abs(out["gap"]) < 0.05
    # site "marked" holds most of class 2 and its every patient scores high on class 2,
    # within each site p_2 ranks nothing
    confounded = {"marked": _site_of(rng, np.array([2] * 120 + [0, 1] * 15), 3.0, informative=False),
                  **{f"s{i}": _site_of(rng, np.array([2] * 10 + [0, 1] * 70), 0.0, informative=False)
                     for i in range(2)}}
    out = multiclass_pooled_vs_within_auc(confounded, n_boot=200)
    assert out["alarm"] and "2" in out["classes"] and out["sites"][0] == "marked"
    assert out["per_class"]["2"]["gap"] > 0.2 and "class 2 (one-vs-rest)" in out["reason"]


def test_smote_balances_three_classes():
    from fedir.client.smote import oversampled

    rng = np.random.default_rng(0)
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 5 + [-1] * 4)
    x = torch.from_numpy(rng.normal(size=(y.numel(), 2)).astype(np.float32)) + y.view(-1, 1).float()
    new_x, new_y, added = oversampled(x, y, seed=0)
    assert added == (30 - 10) + (30 - 5)
    assert torch.bincount(new_y[new_y >= 0]).tolist() == [30, 30, 30] and int((new_y == -1).sum()) == 4
    assert torch.equal(new_x[: x.shape[0]], x)  # the real rows first, unchanged


def test_a_scenario_file_sets_the_classes(tmp_path):
    from fedir.simulations.scenario import ScenarioError, load_scenario

    sites = ", ".join(f'"{Path(s).name}"' for s in _federation(tmp_path, sites=2, n=20))
    toml = tmp_path / "s.toml"
    toml.write_text(f'[task]\nclasses = 3\n[federation]\nsites = [{sites}]\n')
    assert load_scenario(toml).task_classes == 3
    toml.write_text(f'[federation]\nsites = [{sites}]\n')  # binary: a label 2 is refused before any run
    with pytest.raises(ManifestError, match="outside the task's classes 0..1"):
        load_scenario(toml)
    toml.write_text(f'[task]\nclasses = 3\n[federation]\nsites = [{sites}]\n[bias]\ncross-site = true\n')
    with pytest.raises(ScenarioError, match="task.classes = 3 cannot use bias.cross-site"):
        load_scenario(toml)


def test_the_balanced_decision_divides_by_the_training_prevalence_and_raises_balanced_accuracy():
    """Calibrated probabilities of an imbalanced population (prevalence 0.8 / 0.1 / 0.1): the
    argmax calls almost everyone class 0; dividing by the prevalence recovers the rare classes,
    as the Bayes rule for balanced accuracy should, while the AUCs do not move."""
    from fedir.tasks.multiclass_metrics import class_priors, decide

    rng = np.random.default_rng(3)
    prior = np.array([0.8, 0.1, 0.1])
    y = rng.choice(3, size=3000, p=prior)
    x = y * 1.0 + rng.normal(scale=0.8, size=3000)  # one feature, class means 0, 1, 2
    likelihood = np.exp(-0.5 * ((x[:, None] - np.arange(3)[None, :]) / 0.8) ** 2)
    p = likelihood * prior
    p /= p.sum(axis=1, keepdims=True)
    counts = {c: int((y == c).sum()) for c in range(3)}
    priors = class_priors(counts, 3)
    assert np.allclose(priors, (np.bincount(y, minlength=3) + 1) / (3000 + 3))
    assert np.array_equal(decide(p), p.argmax(axis=1))
    argmax = balanced_accuracy_score(y, decide(p))
    balanced = balanced_accuracy_score(y, decide(p, priors))
    assert balanced > argmax + 0.1
    ids = [str(i) for i in range(3000)]
    plain = site_multiclass_metrics(y, p, ids, n_boot=0)
    ruled = site_multiclass_metrics(y, p, ids, n_boot=0, priors=priors)
    assert ruled["balanced_accuracy"] == pytest.approx(balanced) and plain["balanced_accuracy"] == pytest.approx(argmax)
    assert ruled["auc"] == plain["auc"]
    assert np.array_equal(np.asarray(ruled["confusion"]), confusion_matrix(y, decide(p, priors), labels=[0, 1, 2]))
    # a class the site has not seen keeps a finite, small weight
    assert np.isfinite(class_priors({0: 5}, 3)).all() and class_priors({0: 5}, 3)[1] == pytest.approx(1 / 8)


def test_task_decision_balanced_needs_more_than_two_classes_and_reaches_the_summary(tmp_path):
    from fedir.simulations.inprocess import run_inprocess

    with pytest.raises(SettingsError, match="task.decision = 'balanced' needs task.classes > 2"):
        Settings(task_decision="balanced")
    settings = Settings(task_classes=3, task_decision="balanced", federation_sites=";".join(_federation(tmp_path)),
                        train_rounds=1, train_local_steps=10, train_batch_size=8, train_lr=0.1, eval_bootstrap=0,
                        data_val_fraction=0.25, data_test_fraction=0.3)
    summary = run_inprocess(settings, tmp_path / "run")
    assert summary["threshold"]["rule"] == "argmax" and summary["threshold"]["decision"] == "balanced"
    assert "prevalence" in summary["threshold"]["reason"]
    assert summary["global"]["balanced_accuracy"] is not None
