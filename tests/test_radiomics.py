"""Radiomics features (fedir.client.radiomics), data.inputs = "radiomics" and its companion baseline."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from skimage.feature import graycomatrix, graycoprops

from fedir.client import radiomics
from fedir.client.inputs import load_view
from fedir.client.manifest import ManifestError
from fedir.client.radiomics import (
    FEATURES,
    FIRST_ORDER,
    GLCM_PROPS,
    discretise,
    first_order,
    glcm,
    image_features,
    read_radiomics_site,
)
from fedir.config import Settings, SettingsError
from fedir.server.report.baseline import baseline_text
from fedir.simulations.companion import radiomics_settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import generate_federation
from tests.dicom_factory import write_dicom


def _by_name(values):
    return dict(zip(FIRST_ORDER, values, strict=True))


def test_first_order_features_match_hand_computed_values():
    # four pixels 0, 0, 0, 4: mean 1, variance (3 * 1 + 9) / 4 = 3, m3 = (3 * -1 + 27) / 4 = 6,
    # m4 = (3 * 1 + 81) / 4 = 21; numpy's linear percentiles of [0, 0, 0, 4]
    f = _by_name(first_order(np.array([[0.0, 0.0], [0.0, 4.0]])))
    assert f["mean"] == pytest.approx(1.0) and f["sd"] == pytest.approx(np.sqrt(3.0))
    assert f["skewness"] == pytest.approx(6 / 3**1.5)
    assert f["kurtosis"] == pytest.approx(21 / 9 - 3)  # excess kurtosis
    assert [f[k] for k in ("p10", "p25", "p50", "p75", "p90")] == pytest.approx([0, 0, 0, 1.0, 2.8])
    assert f["iqr"] == pytest.approx(1.0) and f["energy"] == pytest.approx(16.0)
    # two grey levels, with p = 3/4 and 1/4
    assert f["entropy"] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    # four distinct values 0..3: four bins of the 32, so 2 bits; symmetric: no skew
    g = _by_name(first_order(np.array([[0.0, 1.0], [2.0, 3.0]])))
    assert g["entropy"] == pytest.approx(2.0) and g["skewness"] == pytest.approx(0.0)
    assert g["kurtosis"] == pytest.approx(2.5625 / 1.5625 - 3)


def test_a_constant_image_has_defined_features():
    f = image_features(np.full((8, 8), 7.0))
    assert np.isfinite(f).all()
    by = dict(zip(FEATURES, f))
    assert by["fo_mean"] == 7 and by["fo_sd"] == by["fo_skewness"] == by["fo_kurtosis"] == by["fo_entropy"] == 0
    assert by["glcm_contrast"] == 0 and by["glcm_homogeneity"] == 1 and by["glcm_ASM"] == 1


def test_discretisation_is_a_fixed_bin_number_over_the_image_range():
    image = np.array([[10.0, 20.0], [30.0, 50.0]])
    # floor(32 * (x - 10) / 40), the maximum in the top bin
    assert discretise(image).tolist() == [[0, 8], [16, 31]]
    assert discretise(image, levels=4).tolist() == [[0, 1], [2, 3]]


def test_glcm_features_are_skimages_averaged_over_four_angles():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, size=(24, 24)) + np.linspace(0, 40, 24)
    levels = np.clip(np.floor(32 * (image - image.min()) / (image.max() - image.min())), 0, 31).astype(np.uint8)
    matrix = graycomatrix(levels, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True,
                          normed=True)
    expected = [graycoprops(matrix, prop).mean() for prop in GLCM_PROPS]
    assert glcm(image) == pytest.approx(expected)
    # and the angles matter: a one-angle GLCM of this image gives another contrast
    assert graycoprops(matrix, "contrast")[0, 0] != pytest.approx(expected[0])
    assert len(image_features(image)) == len(FEATURES)


def _site(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["patient_id", "path", "label"], *rows])
    return root


def test_features_of_a_real_dicom_through_the_reader(tmp_path, monkeypatch):
    """A 3-frame DICOM with a rescale, read by the site's reader (modality LUT applied),
    every frame its own row under frame policy "all"; a missing file is skipped and counted;
    the second read comes from the cache, without decoding."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(100, 1000, size=(3, 16, 16)).astype(np.uint16)
    write_dicom(tmp_path / "s" / "a.dcm", pixels, slope=2.0, intercept=-100.0)
    site = _site(tmp_path / "s", [["p1", "a.dcm", "1"], ["p2", "gone.dcm", "0"]])
    got = read_radiomics_site(site, image_size=16, frame_policy="all", val_fraction=0.15, test_fraction=0.25)
    parts = [got.train, got.val, got.test]
    x = torch.cat([p.x for p in parts])
    assert x.shape == (3, len(FEATURES))
    assert [p for part in parts for p in part.patients] == ["p1"] * 3
    assert got.skipped == {"missing file": 1}
    display = pixels.astype(np.float64) * 2.0 - 100.0  # the modality LUT; 16 px: no resize
    for row, frame in zip(x.numpy(), display):
        assert row[FEATURES.index("fo_mean")] == pytest.approx(frame.mean(), rel=1e-6)
        assert row[FEATURES.index("fo_sd")] == pytest.approx(frame.std(), rel=1e-5)
        assert row == pytest.approx(image_features(frame).astype(np.float32), rel=1e-5)
    assert list((site / ".fedir-cache").glob("radiomics-s16-all-*.pt"))

    def never(_image):
        raise AssertionError("extracted again: the cache was not used")

    monkeypatch.setattr(radiomics, "image_features", never)
    again = read_radiomics_site(site, image_size=16, frame_policy="all", val_fraction=0.15, test_fraction=0.25)
    assert torch.equal(torch.cat([again.train.x, again.val.x, again.test.x]), x)


def test_features_of_the_shared_xa_cine_under_the_peak_frame_policy(tmp_path):
    """A real coronary XA cine (96 JPEG frames): the peak frame, resized to 64 px, as the
    model's reader picks and resizes it, before the z-score."""
    from fedir.client.imaging import apply_frame_policy, read_display_frames, resize_frames
    from tests.shared_data import XA_CINE, shared_data

    site = tmp_path / "xa"
    site.mkdir()
    shutil.copyfile(shared_data() / XA_CINE, site / "cine.dcm")
    _site(site, [["p1", "cine.dcm", "1"]])
    got = read_radiomics_site(site, image_size=64, frame_policy="peak", val_fraction=0.15, test_fraction=0.25)
    x = torch.cat([got.train.x, got.val.x, got.test.x])
    assert x.shape == (1, len(FEATURES)) and not got.skipped
    image = resize_frames(apply_frame_policy(read_display_frames(site / "cine.dcm"), "peak"), 64)[0]
    assert x[0].numpy() == pytest.approx(image_features(image).astype(np.float32), rel=1e-5)
    by = dict(zip(FEATURES, x[0].tolist()))
    assert 0 < by["fo_mean"] < 255 and by["fo_sd"] > 1 and 0 < by["fo_entropy"] <= 5  # 8-bit display, 32 levels
    assert by["glcm_contrast"] > 0 and 0 < by["glcm_ASM"] < 1


def test_radiomics_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(SettingsError, match="2D image features.*volume"):
        Settings(data_inputs="radiomics", data_frame_policy="volume")
    with pytest.raises(SettingsError, match="classification baseline.*survival"):
        Settings(data_inputs="radiomics", task_kind="survival")
    with pytest.raises(SettingsError, match="baseline.radiomics = true.*segmentation"):
        Settings(baseline_radiomics=True, task_kind="segmentation")
    with pytest.raises(SettingsError, match="task.classes = 3 cannot use baseline.radiomics"):
        Settings(baseline_radiomics=True, task_classes=3)
    table = tmp_path / "t"
    table.mkdir()
    (table / "manifest.csv").write_text("patient_id,label,clin_age\np1,1,60\n")
    with pytest.raises(ManifestError, match="needs an imaging site|no path column"):
        load_view(str(table), "radiomics", 32, "mip", 0.15, 0.25)


def test_companion_settings_read_the_features_with_their_own_steps():
    s = Settings(federation_sites="x;y", baseline_radiomics=True, baseline_clinical=True,
                 baseline_radiomics_steps=7, baseline_radiomics_lr=0.2, train_objective="fixmatch")
    r = radiomics_settings(s)
    assert (r.data_inputs, r.model_name, r.train_objective, r.train_local_steps, r.train_lr) == \
        ("radiomics", "logreg", "supervised", 7, 0.2)
    assert not r.baseline_radiomics and not r.baseline_clinical and r.federation_sites == "x;y"


def test_an_imaging_run_with_radiomics_and_clinical_baselines_reports_all_three(tmp_path):
    """One short in-process study: the radiomics companion (data.inputs = radiomics) trains a
    logistic regression on every site's features, federated-standardised, and reports
    per-patient AUCs; the imaging run's summary, terminal table and report show it beside
    the imaging and clinical models, on the same test patients."""
    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=24, seed=0, unlabelled_fraction=0.0, image_size=32,
                        progress=False)
    settings = Settings(federation_sites=";".join(str(fed / f"site-{i}") for i in range(2)),
                        model_image_size=32, train_rounds=1, train_local_epochs=1, train_batch_size=8,
                        eval_bootstrap=20, baseline_clinical=True, baseline_clinical_steps=10,
                        baseline_radiomics=True, baseline_radiomics_steps=20)
    summary = run_inprocess(settings, tmp_path / "run")
    companion = json.loads((tmp_path / "run" / "radiomics-baseline" / "summary.json").read_text())
    from fedir.server.runstore import RunStore

    with RunStore(tmp_path / "run" / "radiomics-baseline" / "runs.sqlite") as store:
        assert store.run(companion["run_id"])["config"]["data.inputs"] == "radiomics"
    assert companion["global"]["per_patient"]["auc"] is not None
    cmp = summary["radiomics_baseline"]
    assert cmp["available"] and cmp["run_id"] == companion["run_id"]
    assert summary["clinical_baseline"]["available"]
    for site in ("site-0", "site-1"):
        pair = cmp["per_site"][site]
        per_patient = companion["per_site"][site]["per_patient"]
        assert pair["radiomics"]["auc"] == per_patient["auc"] and per_patient["auc_ci"] is not None
        # one row per image, scored per patient: the imaging model's test patients
        assert pair["radiomics"]["n_test"] == pair["imaging"]["n_test"] > 0
        assert companion["per_site"][site]["n_test"] >= pair["radiomics"]["n_test"]
    text = baseline_text(summary)
    assert "radiomics AUC [95% CI]" in text and "clinical AUC [95% CI]" in text and "imaging AUC" in text
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Clinical-only baseline and Radiomics baseline beside the imaging model" in report
    assert f"{cmp['per_site']['site-0']['radiomics']['auc']:.3f}" in report


def test_compare_has_a_radiomics_arm_paired_with_imaging_and_clinical():
    from fedir.simulations.compare import PatientScores, arm_settings, questions

    s = Settings(federation_sites="x;y", baseline_radiomics=True, baseline_radiomics_steps=9)
    arm = arm_settings(s, "radiomics", None)
    assert (arm.data_inputs, arm.model_name, arm.train_local_steps, arm.baseline_radiomics) == \
        ("radiomics", "logreg", 9, False)
    labels = np.array([0, 1] * 10)
    good, noise = labels + np.linspace(0, 0.1, 20), np.random.default_rng(0).random(20)
    scores = {arm: {"a": PatientScores([f"p{i}" for i in range(20)], labels, s_)}
              for arm, s_ in (("federated", good), ("clinical", noise), ("radiomics", noise))}
    q = questions(scores, seed=0)
    assert q["imaging_vs_radiomics"]["difference"] > 0.3
    assert q["imaging_vs_radiomics"]["difference"] == pytest.approx(q["imaging_vs_clinical"]["difference"])
    assert q["radiomics_vs_clinical"]["difference"] == pytest.approx(0.0)


def test_compare_skips_the_radiomics_arm_on_tabular_sites(tmp_path):
    from fedir.simulations.compare import compare

    rng = np.random.default_rng(0)
    sites = []
    for k in range(2):
        rows = [[f"p{k}-{i}", str(i % 2), f"{50 + 10 * (i % 2) + rng.normal(0, 5):.1f}"] for i in range(40)]
        site = tmp_path / f"t{k}"
        site.mkdir()
        with (site / "manifest.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([["patient_id", "label", "clin_age"], *rows])
        sites.append(str(site))
    said = []
    result = compare(Settings(federation_sites=";".join(sites), train_rounds=1, eval_bootstrap=10,
                              train_optimizer="sgd", train_local_steps=5), tmp_path / "cmp", seeds=[0],
                     arms=["federated", "radiomics"], progress=said.append)
    assert result["arms"] == ["federated"] and any(line.startswith("radiomics: skipped") for line in said)


def test_a_missing_radiomics_companion_is_said_so_beside_the_clinical_table(tmp_path):
    from fedir.server.report.baseline import baseline_section, comparison

    def entry(auc, n):
        pp = {"n_test": n, "n_patients": n, "auc": auc, "auc_ci": [auc - 0.1, auc + 0.1], "accuracy": 0.6,
              "accuracy_ci": [0.5, 0.7]}
        return {**pp, "per_patient": pp}

    imaging = {"per_site": {"a": entry(0.81, 12)}, "global": entry(0.8, 12)}
    clinical = {"run_id": "c1", "per_site": {"a": entry(0.61, 12)}, "global": entry(0.6, 12)}
    summary = {"clinical_baseline": comparison(imaging, clinical),
               "radiomics_baseline": comparison(imaging, None, "radiomics")}
    text = baseline_text(summary)
    assert "Radiomics baseline: not available (no radiomics-baseline/summary.json" in text
    assert "0.610 [0.510, 0.710]" in text and "radiomics AUC" not in text
    html = baseline_section(summary)
    assert "Clinical-only baseline and Radiomics baseline" in html and "not available" in html and "c1" in html
