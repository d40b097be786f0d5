"""Multi-class classification (task.classes = K > 2): the setting, the labels, the model."""

import csv

import pytest
import torch

from fedir.client.manifest import ManifestError
from fedir.client.tabular import read_tabular_site
from fedir.config import Settings, SettingsError
from fedir.models import build_model
from fedir.tasks import task_of


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
