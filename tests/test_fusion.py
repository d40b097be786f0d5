"""data.inputs = "image+clinical": the fused model, its sensitivity analysis, the refusals, a study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from fedir.cli import main as cli_main
from fedir.client.embedding import predict_with_embedding
from fedir.client.input_sensitivity import input_sensitivity
from fedir.client.inputs import check_manifest, load_view
from fedir.client.manifest import ManifestError
from fedir.client.training import predict
from fedir.config import Settings, SettingsError
from fedir.metrics import site_metrics
from fedir.models import FusionNet, build_model, fuse, head_name
from fedir.protocol import SENSITIVITY_KEY, check_sensitivity, decode_evaluation, encode_evaluation
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.scenario import ScenarioError, load_scenario
from fedir.simulations.synthetic import NULL_COVARIATE, generate_federation
from fedir.strategies.input_sensitivity import Z95, pooled_sensitivity

SIZE = 8


def _rows(site: Path) -> list[dict]:
    with (site / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


# ---- the model ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet_small", "densenet121"])
def test_the_fused_model_takes_pixels_then_clinical_values_and_its_head_sees_both(name: str) -> None:
    model = build_model(name, n_features=3, fused_image_size=32)
    assert isinstance(model, FusionNet) and head_name(model) == "head"
    x = fuse(torch.randn(5, 1, 32, 32), torch.randn(5, 3))
    assert x.shape == (5, 32 * 32 + 3)
    assert model(x).shape == (5, 2)
    scores, features = predict_with_embedding(model, x, torch.device("cpu"))
    assert scores.shape == (5,) and features.shape == (5, model.head.in_features)
    np.testing.assert_allclose(features[:, -3:], x[:, -3:].numpy(), rtol=1e-6)  # the embedding ends in the clinical values
    with pytest.raises(ValueError, match="fused rows must be"):
        model(torch.randn(5, 32 * 32))


# ---- the sensitivity analysis on a model whose truth is known ------------------------------

def _known_model(uses: str) -> FusionNet:
    """A FusionNet on 4x4 images and two clinical columns whose head reads only `uses`:
    column 0 ("clin") or the image embedding ("image")."""
    model = build_model("resnet_small", n_features=2, fused_image_size=4)
    assert isinstance(model, FusionNet)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        if uses == "clin":
            model.head.weight[1, -2] = 3.0
        else:  # a linear read-out of the embedding fitted below
            model.image = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
            model.image[1].weight.fill_(1.0 / 16)
            model.image[1].bias.zero_()
            model.head = nn.Linear(4 + 2, 2)
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.weight[1, :4] = 2.0
    return model.eval()


def _data(n_patients: int = 80, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Two images per patient; the label drives clinical column 0 and the image brightness;
    column 1 is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    y[:2] = [0, 1]
    clin = np.stack([y + rng.normal(0, 0.7, n_patients), rng.normal(0, 1, n_patients)], axis=1)
    rows, labels, patients = [], [], []
    for i in range(n_patients):
        for _ in range(2):
            image = rng.normal(0, 1, (1, 4, 4)) + 1.5 * y[i]
            rows.append(fuse(torch.tensor(image[None], dtype=torch.float32), torch.tensor(clin[i][None], dtype=torch.float32)))
            labels.append(y[i])
            patients.append(f"P{i:03d}")
    return torch.cat(rows), np.asarray(labels), patients


def _analysis(model: nn.Module) -> dict:
    x, y, patients = _data()
    return input_sensitivity(lambda rows: predict(model, rows, torch.device("cpu")), x, y, patients,
                             ["clin_used", "clin_noise"], (1, 4, 4), repeats=4, blur=1.0, n_boot=300, seed=1)


def _by_label(analysis: dict) -> dict[str, dict]:
    return {f"{i['input']} {i['change']}": i for i in analysis["inputs"]}


def test_permuting_the_variable_a_model_uses_drops_the_auc_and_one_it_ignores_does_not() -> None:
    out = _analysis(_known_model("clin"))
    assert out["n_patients"] == 80 and out["auc"] > 0.8 and out["reason"] is None
    items = _by_label(out)
    used, noise = items["clin_used permuted"], items["clin_noise permuted"]
    assert used["drop"] > 0.2 and used["drop_ci"][0] > 0  # the model uses it
    assert noise["drop_ci"][0] <= 0 <= noise["drop_ci"][1] and abs(noise["drop"]) < 1e-9  # the head ignores it
    for change in ("image blank", "image blurred"):
        assert items[change]["drop_ci"][0] <= 0 <= items[change]["drop_ci"][1]
    check_sensitivity(out)  # what the site computes is what may cross


def test_blanking_the_image_of_a_model_that_reads_it_drops_the_auc() -> None:
    items = _by_label(_analysis(_known_model("image")))
    assert items["image blank"]["drop"] > 0.2 and items["image blank"]["drop_ci"][0] > 0
    for name in ("clin_used permuted", "clin_noise permuted"):
        assert abs(items[name]["drop"]) < 1e-9


def test_too_few_patients_or_one_class_sends_only_the_reason() -> None:
    x, y, patients = _data(n_patients=4)
    score = lambda rows: predict(_known_model("clin"), rows, torch.device("cpu"))  # noqa: E731
    few = input_sensitivity(score, x, y, patients, ["clin_used", "clin_noise"], (1, 4, 4), n_boot=50)
    assert few["inputs"] == [] and "fewer than 5" in few["reason"]
    x, y, patients = _data()
    one = input_sensitivity(score, x, np.zeros_like(y), patients, ["clin_used", "clin_noise"], (1, 4, 4), n_boot=50)
    assert one["inputs"] == [] and "one class" in one["reason"]


# ---- the wire and the pooling ---------------------------------------------------------------

def _metrics() -> dict:
    return site_metrics(np.array([0, 1, 0, 1]), np.array([0.2, 0.7, 0.4, 0.9]), ["a", "b", "c", "d"], n_boot=0)


def test_the_sensitivity_entry_crosses_checked_and_nothing_else_passes() -> None:
    entry = _analysis(_known_model("clin"))
    site, decoded = decode_evaluation(encode_evaluation("site-a", _metrics(), sensitivity=entry))
    assert site == "site-a" and decoded[SENSITIVITY_KEY] == check_sensitivity(entry)
    assert SENSITIVITY_KEY not in decode_evaluation(encode_evaluation("site-a", _metrics()))[1]
    with pytest.raises(ValueError, match="expected exactly"):
        check_sensitivity({**entry, "scores": [0.1, 0.9]})
    bad = {**entry, "inputs": [{**entry["inputs"][0], "input": "P001"}]}
    with pytest.raises(ValueError, match="is not a clin_\\* column"):
        check_sensitivity(bad)
    with pytest.raises(ValueError, match="carry exactly"):
        check_sensitivity({**entry, "inputs": [{**entry["inputs"][0], "patients": ["P001"]}]})


def test_the_pooled_drop_is_the_patient_weighted_mean_with_the_sites_standard_errors() -> None:
    def site(n: int, drop: float, se: float) -> dict:
        return {"n_patients": n, "inputs": [{"input": "clin_age", "change": "permuted", "drop": drop, "drop_se": se},
                                            {"input": "clin_null", "change": "permuted", "drop": 0.0, "drop_se": 0.0}]}
    pooled = pooled_sensitivity({"a": site(30, 0.10, 0.04), "b": site(10, 0.02, 0.08)})
    age = pooled["inputs"][0]
    assert pooled["ranking"] == ["clin_age permuted", "clin_null permuted"]
    assert age["drop"] == pytest.approx((30 * 0.10 + 10 * 0.02) / 40)
    se = np.sqrt((0.75 * 0.04) ** 2 + (0.25 * 0.08) ** 2)
    assert age["drop_se"] == pytest.approx(se) and age["drop_ci"] == pytest.approx([age["drop"] - Z95 * se, age["drop"] + Z95 * se])
    assert pooled["inputs"][1]["drop_ci"] == [0.0, 0.0]  # an ignored input: SE 0 weighs like any other site
    assert pooled_sensitivity({"a": {"n_patients": 3, "inputs": [], "reason": "fewer than 5 test patients"}})["reason"]


# ---- refusals -------------------------------------------------------------------------------

def _site(root: Path, name: str, columns: dict[str, str]) -> Path:
    site = root / name
    site.mkdir(parents=True)
    with (site / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["patient_id", *columns])
        writer.writeheader()
        writer.writerow({"patient_id": "P1", **columns})
    return site


def test_a_site_without_clin_columns_or_without_images_is_refused_in_one_line(tmp_path: Path) -> None:
    images_only = _site(tmp_path, "a", {"path": "x.dcm", "label": "1"})
    with pytest.raises(ManifestError, match="needs clin_\\* columns") as exc:
        check_manifest(str(images_only), "image+clinical")
    assert "\n" not in str(exc.value)
    table = _site(tmp_path, "b", {"clin_age": "60", "label": "1"})
    with pytest.raises(ManifestError, match="needs images"):
        load_view(str(table), "image+clinical", SIZE, "mip", 0.15, 0.25)


@pytest.mark.parametrize(("key", "value"), [("train.objective", "fixmatch"), ("train.smote", True),
                                            ("model.name", "logreg"), ("task.kind", "survival")])
def test_what_a_fused_study_cannot_use_is_refused(key: str, value: object) -> None:
    with pytest.raises(SettingsError, match=f"data.inputs = 'image\\+clinical' cannot use {key}"):
        Settings.from_run_config({"data.inputs": "image+clinical", key: value})


def test_sites_with_different_clinical_columns_are_refused_before_the_study(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=4, seed=0, image_size=16, progress=False)
    rows = _rows(fed / "site-1")
    with (fed / "site-1" / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "clin_sex"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "clin_sex"} for r in rows)
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["fed/site-0", "fed/site-1"]\n[data]\ninputs = "image+clinical"\n')
    with pytest.raises(ScenarioError, match="the same clin_\\* columns at every site; site-0: clin_age, clin_sex; "
                                            "site-1: clin_age"):
        load_scenario(toml)


# ---- the generator's null covariate -----------------------------------------------------------

def test_the_null_covariate_adds_a_column_and_changes_nothing_else(tmp_path: Path) -> None:
    plain, with_null = tmp_path / "plain", tmp_path / "null"
    generate_federation(plain, sites=2, patients=6, seed=2, image_size=16, progress=False)
    assert cli_main(["data", "synth", str(with_null), "--sites", "2", "--patients", "6", "--seed", "2",
                     "--image-size", "16", "--null-covariate"]) == 0
    assert json.loads((with_null / "federation.json").read_text())["parameters"]["null_covariate"] is True
    for site in ("site-0", "site-1"):
        a, b = _rows(plain / site), _rows(with_null / site)
        assert [{k: v for k, v in r.items() if k != NULL_COVARIATE} for r in b] == a
        per_patient = {}
        for row in b:
            assert per_patient.setdefault(row["patient_id"], row[NULL_COVARIATE]) == row[NULL_COVARIATE]
            assert np.array_equal(pydicom.dcmread(plain / site / row["path"]).pixel_array,
                                  pydicom.dcmread(with_null / site / row["path"]).pixel_array)
        assert len(set(per_patient.values())) > 1


# ---- a study ---------------------------------------------------------------------------------

def test_a_fused_study_writes_the_sensitivity_block_the_report_and_the_checklist(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=30, seed=1, image_size=16, progress=False, null_covariate=True,
                        unlabelled_fraction=0.0)
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["fed/site-0", "fed/site-1"]\n[train]\nrounds = 1\n'
                    '[model]\nimage-size = 16\n[data]\ninputs = "image+clinical"\ntest-fraction = 0.4\n'
                    '[eval]\nbootstrap = 50\nsensitivity-repeats = 2\n')
    out = tmp_path / "run"
    summary = run_inprocess(load_scenario(toml), out)
    block = summary["sensitivity"]
    assert block["inputs"] == "image+clinical" and block["reason"] is None and set(block["per_site"]) == {"site-0", "site-1"}
    expected = {"clin_age permuted", "clin_sex permuted", "clin_null permuted", "image blank", "image blurred"}
    for entry in block["per_site"].values():
        assert {f"{i['input']} {i['change']}" for i in entry["inputs"]} == expected
        assert entry["repeats"] == 2
    assert set(block["pooled"]["ranking"]) == expected
    assert json.loads((out / "summary.json").read_text())["sensitivity"] == block
    item = next(i for i in summary["checklist"] if i["item"] == "sensitivity analysis (fused inputs)")
    assert item["status"] == "ok" and "clin_null permuted" in item["detail"]
    report = (out / "report.html").read_text()
    assert "<h2>Sensitivity analysis (fused inputs)</h2>" in report and "clin_null permuted" in report
