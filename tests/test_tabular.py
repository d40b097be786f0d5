"""Tabular sites: recognised from the manifest, split column, federated standardisation."""

import csv

import numpy as np
import pytest
import torch

from fedir.client.manifest import ManifestError
from fedir.client.objectives import build_objective
from fedir.client.tabular import is_tabular_site, read_tabular_site
from fedir.client.training import TrainConfig, proximal_term, train
from fedir.models import build_model
from fedir.protocol import FeatureSums, combine, decode_feature_sums, encode_feature_sums


def _write(site, rows):
    site.mkdir(parents=True, exist_ok=True)
    with (site / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return site


def test_a_manifest_with_clin_columns_and_no_path_is_tabular(tmp_path):
    tab = _write(tmp_path / "t", [{"patient_id": "a", "label": 1, "clin_age": 50}])
    img = _write(tmp_path / "i", [{"patient_id": "a", "path": "x.dcm", "label": 1, "clin_age": 50}])
    none = _write(tmp_path / "n", [{"patient_id": "a", "label": 1}])
    assert is_tabular_site(tab) and not is_tabular_site(img) and not is_tabular_site(none)


def test_split_column_overrides_the_hash_split_and_missing_rows_are_dropped(tmp_path):
    rows = [{"patient_id": f"p{i}", "label": i % 2, "split": "test" if i < 3 else "train",
             "clin_a": i, "clin_b": "" if i == 9 else 2 * i} for i in range(10)]
    site = read_tabular_site(_write(tmp_path / "s", rows))
    assert site.test.patients == ["p0", "p1", "p2"]
    assert len(site.train.patients) == 6 and site.dropped_missing == 1
    assert site.features == ["clin_a", "clin_b"] and site.train.x.shape == (6, 2)
    rows[0]["split"] = "holdout"
    with pytest.raises(ManifestError, match="holdout"):
        read_tabular_site(_write(tmp_path / "bad", rows))


def test_federated_sums_give_the_pooled_mean_and_std():
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, size=(20 + 7 * i, 3)) for i in range(4)]
    mean, std = combine([FeatureSums.of(p) for p in parts]).mean_std()
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(mean, pooled.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, pooled.std(0), rtol=1e-10)


def test_feature_sums_cross_the_boundary_and_imaging_sites_send_none():
    sums = FeatureSums.of(np.array([[1.0, 2.0], [3.0, 5.0]]))
    names, back = decode_feature_sums(encode_feature_sums(["clin_a", "clin_b"], sums))
    assert names == ["clin_a", "clin_b"] and back.n == 2
    np.testing.assert_allclose(back.total_sq, [10.0, 29.0])
    assert decode_feature_sums(encode_feature_sums([], None)) == ([], None)


def test_step_budget_sgd_and_proximal_term_keep_weights_near_the_global_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = (x[:, 0] > 0).long()
    moved = {}
    for mu in (0.0, 20.0):
        model = build_model("logreg", n_features=5)
        start = [p.detach().clone() for p in model.parameters()]
        result = train(model, x, y, build_objective("supervised"),
                       TrainConfig(batch_size=4, lr=0.05, optimizer="sgd", steps=37, proximal_mu=mu,
                                   weight_decay=0.0), torch.device("cpu"))
        assert result.steps == 37  # exactly the budget, across more than one pass over 40 rows
        with torch.no_grad():
            moved[mu] = float(proximal_term(model, start, 2.0))
    assert moved[20.0] < 0.25 * moved[0.0]


def test_clinical_inputs_of_an_imaging_site_give_one_row_per_patient_in_its_image_split(tmp_path):
    from fedir.client.inputs import load_view
    from fedir.client.split import split_of

    rows = [{"patient_id": f"p{i}", "path": f"img{i}-{k}.dcm", "label": i % 2,
             "clin_age": 50 + i, "clin_sex": i % 3 == 0} for i in range(30) for k in range(2)]
    for r in rows:
        r["clin_sex"] = int(r["clin_sex"])
    site = _write(tmp_path / "imaging", rows)
    assert not is_tabular_site(site)
    view = load_view(str(site), "clinical", 64, "mip", 0.15, 0.25)
    expected = sorted(f"p{i}" for i in range(30) if split_of(f"p{i}", 0.15, 0.25) == "test")
    assert view.tabular and sorted(view.test_patients) == expected
    assert len(view.train_y) == sum(split_of(f"p{i}", 0.15, 0.25) == "train" for i in range(30))
    assert view.features == ["clin_age", "clin_sex"]
    with pytest.raises(ValueError, match="inputs"):
        load_view(str(site), "pixels", 64, "mip", 0.15, 0.25)
