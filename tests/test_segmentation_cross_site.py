"""Cross-site evaluation of a segmentation study (`bias.cross-site = true`): each site scores
every site's own model on its test patients with the kind's metrics (per-patient Dice, its
patient-bootstrap CI computed at the site), the row crosses as aggregates only, and the Dice
matrix feeds the verdict as a secondary signal with its own threshold
(`bias.max-cross-site-dice-gap`), summary.json and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedir.config import Settings, SettingsError
from fedir.protocol import CROSS_SITE_ACTION, METRICS_KEY, decode_cross_site, decode_cross_site_models, encode_cross_site
from fedir.server.report.bias import bias_section
from fedir.strategies.cross_site_gap import cross_site_gap
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.tasks import classification, survival, task_of
from fedir.tasks.segmentation_metrics import site_segmentation_metrics

SITES = ("site-0", "site-1", "site-2")


def _masks(n: int, size: int, shift: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, S, S) reference label maps (a vessel bar with a stenosis) and a prediction that is
    the reference shifted down by `shift` pixels."""
    rng = np.random.default_rng(seed)
    ref = np.zeros((n, 1, size, size), dtype=np.uint8)
    for i in range(n):
        row = int(rng.integers(2, size - 8))
        ref[i, 0, row:row + 4, 2:size - 2] = 1
        ref[i, 0, row:row + 4, size // 2:size // 2 + 3] = 2
    return ref, np.roll(ref[:, 0], shift, axis=1)


# ---- settings --------------------------------------------------------------------------------


def test_segmentation_takes_cross_site_and_survival_and_k3_still_refuse_it_in_one_line():
    settings = Settings.from_run_config({"task.kind": "segmentation", "bias.cross-site": True})
    assert settings.bias_cross_site and task_of("segmentation").CROSS_SITE_METRIC == "dice"
    assert classification.CROSS_SITE_METRIC == "auc" and survival.CROSS_SITE_METRIC is None
    for config, refusal in (({"task.kind": "survival"}, "task.kind = 'survival' cannot use bias.cross-site"),
                            ({"task.classes": 3}, "task.classes = 3 cannot use bias.cross-site")):
        with pytest.raises(SettingsError) as err:
            Settings.from_run_config({**config, "bias.cross-site": True})
        assert refusal in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SettingsError, match="bias.max-cross-site-dice-gap"):
        Settings.from_run_config({"bias.max-cross-site-dice-gap": -0.1})


# ---- what crosses ------------------------------------------------------------------------------


def test_a_segmentation_cross_site_row_crosses_as_fixed_length_dice_aggregates_and_round_trips():
    shapes = set()
    for n in (6, 15):  # the row's shape must not depend on the site's size
        patients = [f"patient-{i // 3}" for i in range(n)]
        row = {}
        for shift, model in enumerate(SITES):
            ref, pred = _masks(n, 24, shift, seed=n)
            row[model] = site_segmentation_metrics(ref, pred, patients, n_boot=50, seed=0)
        content = encode_cross_site("site-1", row, metric="dice")
        rec = content.metric_records[METRICS_KEY]
        assert set(rec) == {"dice", "dice-ok", "dice-ci", "dice-ci-ok", "n"}  # nothing else leaves
        shapes.add(tuple(sorted((k, len(v)) for k, v in rec.items())))
        assert not content.array_records
        text = json.dumps({k: dict(v) for k, v in content.config_records.items()})
        assert "patient-" not in text
        site, back = decode_cross_site(content, metric="dice")
        assert site == "site-1" and list(back) == list(SITES)
        for model in SITES:
            assert back[model]["dice"] == pytest.approx(row[model]["dice"])
            assert back[model]["dice_ci"] == pytest.approx(row[model]["dice_ci"]) and back[model]["n"] == n
        assert back["site-0"]["dice"] == pytest.approx(1.0) and back["site-2"]["dice"] < back["site-1"]["dice"]
        with pytest.raises(KeyError, match="auc"):  # the server expects its own kind's metric
            decode_cross_site(content, metric="auc")
    assert len(shapes) == 1 and dict(next(iter(shapes)))["dice-ci"] == 2 * len(SITES)


# ---- the signal and the verdict ------------------------------------------------------------------


def _matrix(own: float, other: float, half: float = 0.02) -> dict:
    return {m: {d: {"dice": own if m == d else other, "dice_ci": [(own if m == d else other) - half,
                                                                   (own if m == d else other) + half], "n": 40}
                for d in SITES} for m in SITES}


def _clean_federation():
    """Three sites with balanced foreground tables, equal Dice, no embedding: no other signal fires."""
    from tests.test_segmentation_bias import _federation

    tables, per_site, _ = _federation(1, confounded=False, separable=False, dice=(0.8, 0.8, 0.8))
    return tables, per_site


def test_the_dice_gap_has_its_own_threshold_and_is_a_secondary_signal():
    tables, per_site = _clean_federation()
    matrix = _matrix(0.80, 0.65)  # gap 0.15: over the AUC's 0.1, under the Dice default 0.2
    assert cross_site_gap(matrix, metric="dice", max_gap=0.1)["alarm"]
    quiet = analyse(tables, per_site, {}, Thresholds(), matrix, kind="segmentation")
    test = quiet["tests"]["cross_site"]
    assert test["metric"] == "dice" and test["gap"] == pytest.approx(0.15) and test["thresholds"]["max_gap"] == 0.2
    assert test["matrix"]["site-1"]["site-1"] == 0.80 and test["matrix_ci"]["site-1"]["site-2"] == [0.63, 0.67]
    assert not test["alarm"] and quiet["signals"] == [] and quiet["alarm"] is False
    fired = analyse(tables, per_site, {}, Thresholds(max_cross_site_dice_gap=0.1), matrix, kind="segmentation")
    assert fired["tests"]["cross_site"]["alarm"] and fired["signals"] == ["cross_site"]
    # secondary: alone a warning, not the alarm
    assert fired["alarm"] is False and len(fired["warnings"]) == 1 and "Dice on their own site" in fired["warnings"][0]
    # the leave-one-site-out reruns leave the matrix out (it belongs to the run's models)
    assert all("cross_site" not in e["signals"] for e in fired["sensitivity"]["by_site"].values())
    json.dumps(fired, allow_nan=False)


def test_a_gap_whose_interval_covers_zero_does_not_fire():
    out = cross_site_gap(_matrix(0.80, 0.50, half=0.45), metric="dice", max_gap=0.2)
    assert out["computable"] and out["gap"] == pytest.approx(0.3) and out["gap_ci"][0] < 0 and not out["alarm"]


def test_the_report_shows_the_dice_matrix_with_its_intervals():
    tables, per_site = _clean_federation()
    bias = analyse(tables, per_site, {}, Thresholds(), _matrix(0.80, 0.65), kind="segmentation")
    html = str(bias_section(bias))
    assert "<h3>Cross-site evaluation</h3>" in html and "Dice [95% CI]: model of site" in html
    assert "0.800 [0.780, 0.820]" in html and "0.650 [0.630, 0.670]" in html
    assert "Dice of each site&#39;s own model: own site 0.80, other sites 0.65, gap 0.15" in html


# ---- end to end ----------------------------------------------------------------------------------

SCENARIO = ('[task]\nkind = "segmentation"\n[federation]\nsites = ["fed/site-0", "fed/site-1", "fed/site-2"]\n'
            "[train]\nrounds = 2\nlocal-epochs = 3\nlr = 0.01\nbatch-size = 8\n[model]\nimage-size = 32\n"
            '[data]\nframe-policy = "all"\ntest-fraction = 0.3\nval-fraction = 0.2\n[eval]\nbootstrap = 100\n'
            "[bias]\ncross-site = true\n")


def _independent_dice(state: dict[str, np.ndarray], x: torch.Tensor, masks: np.ndarray, patients: list[str]) -> float:
    """A site model's per-patient mean Dice on one site's test images, recomputed here with
    MONAI's DiceMetric (foreground classes, empty reference classes ignored, the classes'
    mean per image, the images' mean per patient, the patients' mean)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from fedir.models import build_model

    model = build_model("basic_unet", n_outputs=3)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        labels = model(x).argmax(dim=1, keepdim=True)
    y = torch.as_tensor(masks, dtype=torch.int64).reshape(labels.shape)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(one_hot(labels, 3), one_hot(y, 3))
    per_image = np.nanmean(np.asarray(dice), axis=1)
    who = np.asarray(patients)
    keep = np.isfinite(per_image)
    return float(np.mean([per_image[keep & (who == p)].mean() for p in np.unique(who[keep])]))


@pytest.mark.slow  # ~40 s on one core: in `make test`, not in test-fast
def test_a_segmentation_study_with_cross_site_reports_a_dice_matrix_recomputable_from_the_site_models(tmp_path):
    from fedir.client.client_app import build_client_app
    from fedir.client.inputs import view_of
    from fedir.server.server_app import run_study
    from fedir.simulations.inprocess import InProcessGrid
    from fedir.simulations.scenario import load_scenario
    from fedir.simulations.synthetic import generate_federation

    class CapturingGrid(InProcessGrid):
        """Every message a site handled, with its reply, as they crossed."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.handled: list[tuple[Message, Message]] = []

        def _handle(self, msg: Message) -> Message:
            reply = super()._handle(msg)
            self.handled.append((msg, reply))
            return reply

    generate_federation(tmp_path / "fed", sites=3, patients=16, seed=3, image_size=32, progress=False,
                        mask_fraction=0.0)
    (tmp_path / "seg.toml").write_text(SCENARIO)
    settings = load_scenario(tmp_path / "seg.toml")
    grid = CapturingGrid(build_client_app(settings), len(settings.sites), settings.to_run_config())
    summary = run_study(grid, settings, tmp_path / "run", scenario="in-process")

    cross = [(m, r) for m, r in grid.handled if m.metadata.message_type == CROSS_SITE_ACTION]
    assert len(cross) == 3 and not any(r.has_error() for _, r in cross)
    models, _ = decode_cross_site_models(cross[0][0].content)
    assert sorted(models) == list(SITES)
    test = summary["bias"]["tests"]["cross_site"]
    assert test["metric"] == "dice" and test["computable"] and set(test["matrix"]) == set(SITES)
    views = {s: view_of(str((tmp_path / "fed" / s).resolve()), settings) for s in SITES}
    for _, reply in cross:
        # aggregates only: the kind's five fixed-length vectors, no arrays, no patient id
        assert not reply.content.array_records
        rec = reply.content.metric_records[METRICS_KEY]
        assert {k: len(v) for k, v in rec.items()} == {"dice": 3, "dice-ok": 3, "dice-ci": 6, "dice-ci-ok": 3, "n": 3}
        data_site, row = decode_cross_site(reply.content, metric="dice")
        text = json.dumps({k: dict(v) for k, v in reply.content.config_records.items()})
        assert not any(p in text for p in set(views[data_site].test_patients))
        view = views[data_site]
        for model_site in SITES:
            entry = row[model_site]
            assert entry["n"] <= len(view.test_x)
            assert entry["dice"] == pytest.approx(test["matrix"][model_site][data_site])
            assert entry["dice_ci"] == pytest.approx(test["matrix_ci"][model_site][data_site])
            assert entry["dice_ci"][0] <= entry["dice"] <= entry["dice_ci"][1]
        # the diagonal and one off-diagonal cell, recomputed from the models that were sent
        for model_site in {data_site, SITES[(SITES.index(data_site) + 1) % 3]}:
            state = {k: a.numpy() for k, a in models[model_site].items()}
            expected = _independent_dice(state, view.test_x, view.test_y.numpy(), view.test_patients)
            assert row[model_site]["dice"] == pytest.approx(expected, abs=1e-5), (model_site, data_site)
    # the site models are the selected round's updates, not the global model the sites evaluated
    diagonal = [test["matrix"][s][s] for s in SITES]
    assert test["diagonal"] == pytest.approx(np.mean(diagonal))
    assert ("cross_site" in summary["bias"]["signals"]) == test["alarm"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["bias"]["tests"]["cross_site"]["matrix"] == test["matrix"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<h3>Cross-site evaluation</h3>" in report and "Dice [95% CI]: model of site" in report
    cell = test["matrix"]["site-0"]["site-1"]
    ci = test["matrix_ci"]["site-0"]["site-1"]
    assert f"{cell:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in report
