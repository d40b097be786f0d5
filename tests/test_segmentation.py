"""Task kind "segmentation": its metrics against MONAI's own, their pooling, its settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from fedir.config import Settings, SettingsError
from fedir.tasks import segmentation, task_of
from fedir.tasks.segmentation_metrics import (
    DICE_BINS,
    DICE_HIST,
    pooled_segmentation_metrics,
    site_segmentation_metrics,
)


def _masks(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size) reference label maps (a bar of vessel with a stenosis blob) and a
    prediction that is the reference shifted by a random 0-3 pixels, with noise."""
    rng = np.random.default_rng(seed)
    ref = np.zeros((n, size, size), dtype=np.uint8)
    pred = np.zeros_like(ref)
    for i in range(n):
        row = rng.integers(4, size - 8)
        ref[i, row:row + 4, 2:size - 2] = 1
        ref[i, row:row + 4, size // 2:size // 2 + 3] = 2
        shift = int(rng.integers(0, 4))
        pred[i] = np.roll(ref[i], shift, axis=0)
        pred[i][rng.random((size, size)) < 0.02] = 1
    return ref, pred


def _monai_dice(ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per image Dice as MONAI computes it, averaged over the foreground classes."""
    y = one_hot(torch.as_tensor(ref, dtype=torch.int64)[:, None], 3)
    p = one_hot(torch.as_tensor(pred, dtype=torch.int64)[:, None], 3)
    metric = DiceMetric(include_background=False, reduction="mean_channel")
    metric(p, y)
    return metric.aggregate().numpy().reshape(-1)


def test_site_dice_is_the_patient_mean_of_monais_per_image_dice():
    ref, pred = _masks(12, 32, seed=1)
    patients = [f"p{i // 3}" for i in range(12)]  # 4 patients of 3 images
    out = site_segmentation_metrics(ref[:, None], pred, patients, n_boot=200, seed=0)
    per_image = _monai_dice(ref, pred)
    per_patient = per_image.reshape(4, 3).mean(axis=1)
    assert out["n"] == 12 and out["n_patients"] == 4
    assert out["dice"] == pytest.approx(per_patient.mean(), abs=1e-6)
    assert out["dice_ci"][0] <= out["dice"] <= out["dice_ci"][1]
    assert out["hd95"] is not None and out["hd95"] >= 0
    assert out[DICE_HIST] == np.histogram(per_image, bins=DICE_BINS, range=(0, 1))[0].tolist()
    assert out["sums"][0] == pytest.approx(per_patient.sum(), abs=1e-6)


def test_dice_per_class_matches_monai_on_a_hand_made_case():
    # 8x8 frames. Image 0: vessel of 8 pixels, the prediction hits 6 and adds 2 (Dice 12/16);
    # stenosis of 4 pixels, predicted 2 of them (Dice 4/6). Image 1 (patient b): vessel only
    # (reference 4 pixels, prediction all 4: Dice 1), so it has no stenosis Dice at all.
    ref = np.zeros((2, 8, 8), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :] = 1
    pred[0, 0, 1:7] = 1
    pred[0, 1, 0:2] = 1
    ref[0, 4:6, 4:6] = 2
    pred[0, 4, 4:6] = 2
    ref[1, 3, 2:6] = 1
    pred[1, 3, 2:6] = 1
    out = site_segmentation_metrics(ref[:, None], pred, ["a", "b"], n_boot=0, seed=0)
    y = one_hot(torch.as_tensor(ref, dtype=torch.int64)[:, None], 3)
    p = one_hot(torch.as_tensor(pred, dtype=torch.int64)[:, None], 3)
    monai = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, y).numpy()
    assert monai[0] == pytest.approx([12 / 16, 4 / 6]) and np.isnan(monai[1, 1])
    assert out["dice_vessel"] == pytest.approx((12 / 16 + 1.0) / 2)
    assert out["dice_stenosis"] == pytest.approx(4 / 6)  # patient b has no stenosis: left out
    assert out["n_vessel_patients"] == 2 and out["n_stenosis_patients"] == 1
    assert out["dice"] == pytest.approx(((12 / 16 + 4 / 6) / 2 + 1.0) / 2)
    assert out["dice_stenosis_ci"] is None and "dice_stenosis_ci" in out["reasons"]
    pooled = pooled_segmentation_metrics({"s0": out, "s1": out})  # the same site twice
    assert pooled["dice_vessel"] == pytest.approx(out["dice_vessel"])
    assert pooled["dice_stenosis"] == pytest.approx(out["dice_stenosis"]) and pooled["n_stenosis_patients"] == 2
    assert pooled["dice_stenosis_ci"] == pytest.approx([4 / 6, 4 / 6])  # two equal patients: no spread


def test_perfect_prediction_has_dice_one_and_hd95_zero():
    ref, _ = _masks(4, 32, seed=2)
    out = site_segmentation_metrics(ref[:, None], ref, ["a", "a", "b", "b"], n_boot=0, seed=0)
    assert out["dice"] == pytest.approx(1.0) and out["hd95"] == pytest.approx(0.0)
    assert out["dice_ci"] is None and "dice_ci" in out["reasons"]


def test_an_image_without_foreground_has_no_dice_and_is_counted():
    ref, pred = _masks(3, 32, seed=3)
    ref[0] = 0
    out = site_segmentation_metrics(ref[:, None], pred, ["a", "b", "c"], n_boot=50, seed=0)
    assert out["n_no_foreground"] == 1 and out["n"] == 2 and out["n_patients"] == 2


def test_pooled_dice_is_the_patient_weighted_mean_of_the_sites():
    sites = {}
    all_patient_dice = []
    for s, n in enumerate((6, 10)):
        ref, pred = _masks(n, 32, seed=10 + s)
        patients = [f"s{s}p{i}" for i in range(n)]
        sites[f"site{s}"] = site_segmentation_metrics(ref[:, None], pred, patients, n_boot=100, seed=0)
        all_patient_dice.extend(_monai_dice(ref, pred))
    pooled = pooled_segmentation_metrics(sites)
    assert pooled["n_patients"] == 16
    assert pooled["dice"] == pytest.approx(np.mean(all_patient_dice), abs=1e-6)
    low, high = pooled["dice_ci"]
    assert low <= pooled["dice"] <= high
    se = np.std(all_patient_dice, ddof=1) / np.sqrt(16)
    assert high - low == pytest.approx(2 * 1.959964 * se, rel=1e-3)
    assert sum(pooled[DICE_HIST]) == 16


def test_the_kind_module_trains_a_basic_unet_with_dice_ce():
    from fedir.models import build_model, resolve_model

    task = task_of("segmentation")
    assert task is segmentation and task.SELECTION_METRIC == "dice"
    model = build_model(resolve_model("auto", tabular=False, kind="segmentation"), n_outputs=task.n_outputs(2))
    x = torch.randn(2, 1, 32, 32)
    y = torch.randint(0, 3, (2, 1, 32, 32))
    out = model(x)
    assert out.shape == (2, 3, 32, 32)
    loss = task.loss(out, y)
    loss.backward()
    assert torch.isfinite(loss) and task.score(out).shape == (2, 32, 32)


@pytest.mark.parametrize("key, value", [
    ("train.mixup-alpha", 0.4),
    ("train.smote", True), ("baseline.clinical", True), ("model.name", "resnet_small"),
])
def test_segmentation_refuses_what_it_cannot_use(key, value):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({"task.kind": "segmentation", key: value})
    assert "\n" not in str(err.value) and key in str(err.value)


def test_a_basic_unet_needs_the_segmentation_kind():
    with pytest.raises(SettingsError, match="segmentation"):
        Settings.from_run_config({"model.name": "basic_unet"})


def test_a_segmentation_evaluation_crosses_as_fixed_length_aggregates_and_round_trips():
    from fedir.protocol import METRICS_KEY, decode_evaluation, encode_evaluation

    lengths = set()
    for n in (5, 17):  # the reply's shape must not depend on the site's size
        ref, pred = _masks(n, 32, seed=n)
        patients = [f"p{i // 2}" for i in range(n)]
        test = site_segmentation_metrics(ref[:, None], pred, patients, n_boot=50, seed=0)
        val = site_segmentation_metrics(ref[:, None], pred, patients, n_boot=0, seed=0)
        content = encode_evaluation("site-a", test, val=val, kind="segmentation")
        rec = content.metric_records[METRICS_KEY]
        lengths |= {len(v) for v in rec.values() if isinstance(v, list)}
        keys = set(rec)
        name, back = decode_evaluation(content)
        assert name == "site-a" and back["dice"] == pytest.approx(test["dice"])
        assert back["dice_ci"] == pytest.approx(test["dice_ci"]) and back["val"]["dice_ci"] is None
        assert back[DICE_HIST] == test[DICE_HIST] and back["sums"] == pytest.approx(test["sums"])
    assert lengths == {2, 8, DICE_BINS}  # CIs, the per-patient sums (4 scalars), the Dice histogram
    assert not any("patient-" in k for k in keys)


def test_a_segmentation_rounds_export_carries_dice_and_no_alarm_number():
    from fedir.server.export import evaluation_scalars

    ref, pred = _masks(6, 32, seed=4)
    site = site_segmentation_metrics(ref[:, None], pred, [f"p{i}" for i in range(6)], n_boot=50, seed=0)
    scalars = evaluation_scalars({"site-a": site}, pooled_segmentation_metrics({"site-a": site}), None)
    assert scalars["dice/site-a"] == pytest.approx(site["dice"]) and "hd95/global" in scalars
    assert "dice_ci_low/site-a" in scalars and "bias/alarm" not in scalars
