"""The bias analysis of a segmentation study from constructed aggregates: foreground fraction by
site (what a site sends, and the test), the bottleneck embedding's separability, the Dice
heterogeneity, leave-one-site-out on the pooled Dice, and the verdict they make."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedir.client.datacard import foreground_counts
from fedir.client.embedding import MAX_DIM, embedding_groups, embedding_moments, predict_with_embedding
from fedir.models import build_model
from fedir.protocol import (
    METRICS_KEY,
    SUPPRESSED,
    ForegroundCounts,
    decode_training,
    encode_training,
    encode_weights,
)
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.strategies.heterogeneity import heterogeneity
from fedir.strategies.segmentation_bias import filled_table, foreground_by_site
from fedir.tasks.segmentation_metrics import FOREGROUND_BIN_NAMES, FOREGROUND_NAMES

BINS = len(FOREGROUND_BIN_NAMES)
STENOSIS = FOREGROUND_NAMES.index("stenosis")


def _labels(patients: int, stenosis: int, size: int = 20, images: int = 2) -> tuple[np.ndarray, list[str]]:
    """`images` label maps per patient: a vessel bar covering 10% of the frame, and, for the
    first `stenosis` patients, a 2 x 4 stenosis (2% of it)."""
    maps, who = [], []
    for p in range(patients):
        for _ in range(images):
            m = np.zeros((1, size, size), dtype=np.int64)
            m[0, 5:7, :] = 1
            if p < stenosis:
                m[0, 5:7, 8:12] = 2
            maps.append(m)
            who.append(f"p{p}")
    return np.stack(maps), who


def _table(vessel: dict[int, int], stenosis: dict[int, int]) -> dict:
    """A site's ForegroundCounts dict from {bin: patients} per class (nothing suppressed)."""
    rows = tuple(tuple(cells.get(b, 0) for b in range(BINS)) for cells in (vessel, stenosis))
    return ForegroundCounts(sum(vessel.values()), 1, rows).as_dict()


# ---- what a site sends ---------------------------------------------------------------------


def test_a_site_counts_each_patient_once_per_class_in_the_bin_of_their_mean_fraction():
    labels, patients = _labels(patients=12, stenosis=7)
    out = foreground_counts(labels, patients, k=5)
    assert out.patients == 12
    vessel = FOREGROUND_BIN_NAMES.index("0.05-0.1")  # 40 - 8 stenosis pixels of 400, or 40
    assert out.counts[0][vessel] + out.counts[0][vessel + 1] == 12
    # stenosis: 7 patients at 8/400 = 2% ("0.01-0.05"), 5 with none ("0")
    assert out.counts[STENOSIS][0] == 5 and out.counts[STENOSIS][FOREGROUND_BIN_NAMES.index("0.01-0.05")] == 7


def test_a_small_cell_is_suppressed_with_its_complement():
    labels, patients = _labels(patients=9, stenosis=2)
    out = foreground_counts(labels, patients, k=5)
    # 2 with a stenosis is below k; suppressed alone it would follow from the total, so the
    # other stenosis cell (7 without) is withheld too
    assert out.counts[STENOSIS][0] == SUPPRESSED and out.counts[STENOSIS][2] == SUPPRESSED
    filled, hidden = filled_table(out.as_dict(), STENOSIS)
    assert hidden == 2 and sum(filled.values()) == 9


def test_the_training_reply_carries_only_fixed_length_counts_and_round_trips():
    """What crosses the wire: the table's counts (integers, their number fixed whatever the
    site's size), the total and k; no fraction, no per-patient value."""
    lengths, keys = set(), []
    for patients in (6, 23):
        labels, who = _labels(patients=patients, stenosis=patients // 2, images=3)
        table = foreground_counts(labels, who, k=5)
        content = encode_training("s", encode_weights({"w": np.zeros(2, np.float32)}), loss=0.1, steps=1,
                                  n_labelled=len(labels), n_unlabelled=0, label_counts={}, num_classes=2,
                                  skipped={}, foreground=table)
        rec = content.metric_records[METRICS_KEY]
        fg = {k: v for k, v in rec.items() if k.startswith("foreground")}
        keys.append(set(fg))
        assert all(isinstance(v, int) for v in fg.values() if not isinstance(v, list))
        assert all(isinstance(c, int) for c in fg["foreground-counts"])  # type: ignore[union-attr]
        lengths.add(len(fg["foreground-counts"]))  # type: ignore[arg-type]
        _, back = decode_training(content)
        assert back["foreground"] == table.as_dict() and back["foreground"]["patients"] == patients
    assert lengths == {len(FOREGROUND_NAMES) * BINS} and keys[0] == keys[1]


@pytest.mark.parametrize("counts", [
    ((3, 0, 0, 0, 0, 0, 0), (3, 0, 0, 0, 0, 0, 0)),  # a cell below k sent as a number
    ((10, 0, 0, 0, 0, 0, 0),),  # one class's row only
    ((6, 0, 0, 0, 0, 0, 0), (5, 0, 0, 0, 0, 0, 0)),  # a row that does not add up, nothing suppressed
])
def test_a_malformed_foreground_table_is_refused(counts):
    with pytest.raises(ValueError, match="foreground counts"):
        ForegroundCounts(6, 5, counts)


# ---- the foreground-by-site test -------------------------------------------------------------


def test_a_confounded_foreground_table_alarms_and_names_the_site():
    """site-0's patients carry the stenoses; the others' have none: the segmentation
    Frankenstein (fedir.simulations.synthetic's confound)."""
    tables = {"site-0": _table({3: 30}, {0: 3, 2: 27}),
              "site-1": _table({3: 30}, {0: 29, 2: 1}),
              "site-2": _table({3: 28}, {0: 28})}
    out = foreground_by_site(tables, alpha=0.01, min_cramers_v=0.2)
    assert out["alarm"] and out["sites"][0] == "site-0"
    assert out["per_class"]["stenosis"]["alarm"] and not out["per_class"]["vessel"]["computable"]
    assert "stenosis fraction is associated with site" in out["reason"] and "stenosis fraction 0.01-0.05" in out["reason"]
    json.dumps(out, allow_nan=False)


def test_a_balanced_foreground_table_does_not_alarm():
    tables = {f"site-{s}": _table({3: 20, 4: 10}, {0: 21, 2: 9}) for s in range(3)}
    tables["site-1"] = _table({3: 18, 4: 12}, {0: 19, 2: 11})
    out = foreground_by_site(tables, alpha=0.01, min_cramers_v=0.2)
    assert out["computable"] and not out["alarm"] and "does not differ" in out["reason"]


def test_one_site_leaves_the_test_not_computable_and_a_site_without_a_table_is_named():
    out = foreground_by_site({"a": _table({3: 10}, {0: 10}), "old": {}})
    assert not out["computable"] and not out["alarm"] and "not computable" in out["reason"]
    assert out["missing"] == ["old"] and "old: no foreground counts sent" in out["reason"]


# ---- the verdict -------------------------------------------------------------------------------


def _dice_site(rng: np.random.Generator, dice: float, n: int = 30) -> dict:
    """A site's Dice entry with the pooling sums of n patients around `dice`."""
    values = np.clip(rng.normal(dice, 0.05, n), 0, 1)
    boots = [values[rng.integers(n, size=n)].mean() for _ in range(200)]
    return {"dice": float(values.mean()), "dice_ci": [float(v) for v in np.percentile(boots, [2.5, 97.5])],
            "n_patients": n, "n_hd95_patients": n, "n": n, "n_no_foreground": 0, "n_no_hd95": 0,
            "n_vessel_patients": n, "n_stenosis_patients": 0,  # vessel only: its Dice is the image's
            "sums": [float(values.sum()), float((values ** 2).sum()), 0.0, 0.0,
                     float(values.sum()), float((values ** 2).sum()), 0.0, 0.0], "dice_hist": [0] * 10}


def _moments(rng: np.random.Generator, site_shift: float, n: int = 60, d: int = 8):
    """Bottleneck moments of n images, half with a stenosis (class 1, shifted along axis 1),
    the site's images shifted by `site_shift` along axis 0."""
    y = np.arange(n) % 2
    f = rng.normal(0, 1, (n, d))
    f[:, 0] += site_shift
    f[:, 1] += 0.5 * y
    return embedding_moments(f, y, 2)


def _federation(seed: int, *, confounded: bool, separable: bool, dice: tuple[float, ...]):
    rng = np.random.default_rng(seed)
    sites = [f"site-{s}" for s in range(len(dice))]
    balanced = _table({3: 30}, {0: 21, 2: 9})
    tables = {s: balanced for s in sites}
    if confounded:
        tables[sites[0]] = _table({3: 30}, {0: 2, 2: 28})
        for s in sites[1:]:
            tables[s] = _table({3: 30}, {0: 30})
    per_site = {s: _dice_site(rng, d) for s, d in zip(sites, dice)}
    moments = {s: _moments(rng, 4.0 * i if separable else 0.0) for i, s in enumerate(sites)}
    return tables, per_site, moments


def test_a_confounded_segmentation_federation_alarms_on_its_foreground_table():
    tables, per_site, moments = _federation(0, confounded=True, separable=False, dice=(0.8, 0.8, 0.8, 0.8))
    result = analyse(tables, per_site, moments, Thresholds(), kind="segmentation")
    assert result["alarm"] is True and "foreground_by_site" in result["signals"]
    assert set(result["tests"]) == {"foreground_by_site", "dice_heterogeneity", "site_separability"}
    json.dumps(result, allow_nan=False)


def test_a_clean_segmentation_federation_is_cleared():
    tables, per_site, moments = _federation(1, confounded=False, separable=False, dice=(0.8, 0.81, 0.79, 0.8))
    result = analyse(tables, per_site, moments, Thresholds(), kind="segmentation")
    assert result["alarm"] is False and result["signals"] == [] and result["warnings"] == []
    assert result["tests"]["site_separability"]["computable"] and not result["tests"]["site_separability"]["alarm"]


def test_separable_bottleneck_embeddings_fire_and_with_dice_heterogeneity_warn_or_alarm_by_the_setting():
    """Site separability is secondary, as for classification: alone a warning; with the Dice
    heterogeneity beside it, two warnings under the default bias.secondary-to-alarm = 0, and
    the alarm under 2."""
    tables, per_site, moments = _federation(2, confounded=False, separable=True, dice=(0.8, 0.8, 0.8, 0.8))
    alone = analyse(tables, per_site, moments, Thresholds(), kind="segmentation")
    sep = alone["tests"]["site_separability"]
    assert sep["alarm"] and sep["site_accuracy"] > 0.9 and sep["class_accuracy"] < 0.7
    assert alone["alarm"] is False and alone["signals"] == ["site_separability"] and len(alone["warnings"]) == 1
    tables, per_site, moments = _federation(2, confounded=False, separable=True, dice=(0.9, 0.6, 0.8, 0.8))
    both = analyse(tables, per_site, moments, Thresholds(), kind="segmentation")
    assert set(both["signals"]) == {"dice_heterogeneity", "site_separability"}
    assert both["alarm"] is False and len(both["warnings"]) == 2
    two = analyse(tables, per_site, moments, Thresholds(secondary_to_alarm=2), kind="segmentation")
    assert two["alarm"] is True and set(two["signals"]) == {"dice_heterogeneity", "site_separability"}
    assert len(two["reasons"]) == 2 and two["warnings"] == []


def test_leave_one_site_out_reruns_the_segmentation_verdict_and_the_pooled_dice():
    tables, per_site, moments = _federation(3, confounded=True, separable=False, dice=(0.8, 0.8, 0.8, 0.4))
    sens = analyse(tables, per_site, moments, Thresholds(), kind="segmentation")["sensitivity"]
    assert sens["metric"] == "dice" and set(sens["by_site"]) == set(per_site)
    # without site-0 the foreground table is balanced (every other site has no stenosis)
    assert sens["by_site"]["site-0"]["alarm"] is False and "without site-0 the alarm clears" in " ".join(sens["flags"])
    assert any("without site-3 the pooled Dice moves" in f for f in sens["flags"])
    assert sens["by_site"]["site-3"]["pooled_dice"] == pytest.approx(0.8, abs=0.03)


def test_heterogeneity_takes_the_metric_name():
    rng = np.random.default_rng(4)
    per_site = {"a": _dice_site(rng, 0.9), "b": _dice_site(rng, 0.5), "c": _dice_site(rng, 0.7),
                "tiny": {"dice": 1.0, "dice_ci": [1.0, 1.0]}}
    out = heterogeneity(per_site, "dice")
    assert out["name"] == "dice_heterogeneity" and out["alarm"] and out["excluded"] == ["tiny"]
    assert set(out["site_dice"]) == {"a", "b", "c"} and out["random_effects_dice"] is not None
    assert "site Dice scores differ" in out["reason"] and "tiny left out" in out["reason"]
    with pytest.raises(ValueError, match="choose one of"):
        heterogeneity(per_site, "hd95")


# ---- the bottleneck embedding at a site --------------------------------------------------------


def test_a_basic_unet_s_embedding_is_its_pooled_bottleneck_grouped_by_stenosis():
    model = build_model("basic_unet", seed=0, n_outputs=3)
    x = torch.randn(6, 1, 32, 32)
    scores, features = predict_with_embedding(model, x, torch.device("cpu"), score=lambda out: out.argmax(dim=1))
    assert scores.shape == (6, 32, 32) and features.shape == (6, model.down_4.convs.conv_1.conv.out_channels)
    labels, _ = _labels(patients=3, stenosis=2, size=32)  # 6 maps, the first 4 with a stenosis
    groups, classes = embedding_groups("segmentation", labels, 2)
    assert classes == 2 and groups.tolist() == [1, 1, 1, 1, 0, 0]
    moments = embedding_moments(features, groups, classes, min_count=2)
    assert moments.counts.tolist() == [2, 4, 6] and moments.dim == MAX_DIM  # 128 channels projected
    _, empty = predict_with_embedding(model, x[:0], torch.device("cpu"), score=lambda out: out.argmax(dim=1))
    assert empty.shape == (0, features.shape[1])
