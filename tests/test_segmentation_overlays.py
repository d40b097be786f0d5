"""Example overlays of a segmentation study (fedir.simulations.overlays): drawn after a run on
a synthetic federation from test patients only, embedded in report.html, each frame's Dice
MONAI's own; on a federation that `fedir data synth` did not write, none and one line why."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from fedir.client.inputs import view_of
from fedir.client.split import split_of
from fedir.client.training import pick_device, predict
from fedir.config import SettingsError
from fedir.models import build_model
from fedir.server.report.segmentation import NO_PIXELS, OVERLAY_DIR, OVERLAY_INDEX, example_overlays
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.overlays import add_overlays, chosen_frames, write_overlays
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import FEDERATION_FILE, generate_federation, synthetic_record
from fedir.tasks import segmentation

SITES = ("site-0", "site-1")
SCENARIO = ('[task]\nkind = "segmentation"\n[federation]\nsites = [{sites}]\n'
            "[train]\nrounds = 1\nlocal-epochs = 2\nlr = 0.01\nbatch-size = 8\n[model]\nimage-size = 32\n"
            '[data]\nframe-policy = "all"\ntest-fraction = 0.3\nval-fraction = 0.2\n[eval]\nbootstrap = 20\n')
PNG = b"\x89PNG\r\n\x1a\n"


def _scenario(root, folder: str):
    toml = root / f"{folder}.toml"
    toml.write_text(SCENARIO.format(sites=", ".join(f'"{folder}/{s}"' for s in SITES)))
    return load_scenario(toml)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One synthetic segmentation study, one round in process (~10 s on one core)."""
    root = tmp_path_factory.mktemp("overlays")
    generate_federation(root / "fed", sites=2, patients=8, seed=3, image_size=32, progress=False, mask_fraction=0.0)
    settings = _scenario(root, "fed")
    summary = run_inprocess(settings, root / "run")
    return root, settings, summary


def _index(out) -> dict:
    return json.loads((out / OVERLAY_DIR / OVERLAY_INDEX).read_text())


@pytest.mark.slow
def test_overlays_are_drawn_from_test_patients_only_and_embedded_in_the_report(run) -> None:
    root, settings, summary = run
    index = _index(root / "run")
    assert index["run_id"] == summary["run_id"] and index["round"] == summary["selection"]["round"]
    report = (root / "run" / "report.html").read_text()
    assert "Example overlays (synthetic test frames)" in report and NO_PIXELS not in report
    for site in SITES:
        entries = [e for e in index["overlays"] if e["site"] == site]
        assert len(entries) == settings.report_overlays == 2
        assert len({e["patient"] for e in entries}) == 2  # distinct patients first
        view = view_of(str((root / "fed" / site).resolve()), settings)
        for entry in entries:
            assert view.test_patients[entry["test_index"]] == entry["patient"]
            assert split_of(entry["patient"], settings.data_val_fraction, settings.data_test_fraction) == "test"
            assert entry["patient"] not in view.val_patients
            data = (root / "run" / OVERLAY_DIR / entry["file"]).read_bytes()
            assert data.startswith(PNG)
            assert base64.b64encode(data).decode("ascii") in report
            assert f"{site}, test patient {entry['patient']}, masked test image {entry['test_index']}: " \
                   f"Dice {entry['dice']:.3f}" in report


def _monai_dice(reference: np.ndarray, predicted: np.ndarray) -> float:
    """One frame's Dice as MONAI computes it, averaged over the foreground classes the
    reference holds."""
    y = one_hot(torch.as_tensor(reference, dtype=torch.int64)[None, None], 3)
    p = one_hot(torch.as_tensor(predicted, dtype=torch.int64)[None, None], 3)
    per_class = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, y).numpy()[0]
    return float(np.nanmean(per_class))


@pytest.mark.slow
def test_each_overlays_dice_is_monais_dice_of_model_pt_on_that_frame(run) -> None:
    root, settings, summary = run
    model = build_model("basic_unet", n_outputs=3)
    model.load_state_dict(torch.load(root / "run" / "model.pt", weights_only=True))
    entries = _index(root / "run")["overlays"]
    assert entries
    for entry in entries:
        view = view_of(str((root / "fed" / entry["site"]).resolve()), settings)
        i = entry["test_index"]
        predicted = predict(model, view.test_x[i:i + 1], pick_device(), score=segmentation.score)[0]
        assert entry["dice"] == pytest.approx(_monai_dice(view.test_y[i, 0].numpy(), predicted), abs=1e-6)


@pytest.mark.slow
def test_fresh_nodes_draw_what_the_runs_own_nodes_drew(run, tmp_path) -> None:
    """`fedir simulate` (Ray) leaves no node in this process: fresh contexts, the site's kept
    state from its disk, give the same frames and Dice as the in-process grid's nodes."""
    root, settings, summary = run
    out = tmp_path / "copy"
    shutil.copytree(root / "run", out)
    again = write_overlays(settings, out, summary)
    assert again is not None and again["overlays"] == _index(root / "run")["overlays"]
    off = write_overlays(replace(settings, report_overlays=0), out, summary)
    assert off is not None and off["overlays"] == [] and off["reason"] == "No example overlays: report.overlays = 0."
    assert not list((out / OVERLAY_DIR).glob("*.png"))
    assert example_overlays(out, summary["run_id"]) == ([], off["reason"])


@pytest.mark.slow
def test_a_federation_not_written_by_fedir_data_synth_gets_no_overlays_and_one_line_why(run) -> None:
    root, settings, _ = run
    for site in SITES:  # the same site folders, copied without federation.json
        shutil.copytree(root / "fed" / site, root / "copied" / site)
    copied = replace(_scenario(root, "copied"), train_local_epochs=1)
    assert synthetic_record(copied.sites) is None
    summary = run_inprocess(copied, root / "copied-run")
    assert summary["per_site"]["site-0"]["dice"] is not None
    assert not (root / "copied-run" / OVERLAY_DIR).exists()
    report = (root / "copied-run" / "report.html").read_text()
    assert f'<p class="muted">{NO_PIXELS}</p>' in report and "<figure" not in report
    # a run folder reused: the overlays an earlier synthetic run left there are removed
    shutil.copytree(root / "run" / OVERLAY_DIR, root / "copied-run" / OVERLAY_DIR)
    add_overlays(copied, root / "copied-run", summary)
    assert not (root / "copied-run" / OVERLAY_DIR).exists()
    assert f'<p class="muted">{NO_PIXELS}</p>' in (root / "copied-run" / "report.html").read_text()


def test_synthetic_record_names_every_site_of_one_fedir_data_synth_folder(tmp_path) -> None:
    generate_federation(tmp_path / "fed", sites=2, patients=1, seed=0, image_size=16, progress=False)
    sites = [str(tmp_path / "fed" / s) for s in SITES]
    record = synthetic_record(sites)
    assert record is not None and record["parameters"]["sites"] == 2
    shutil.copytree(tmp_path / "fed" / "site-1", tmp_path / "elsewhere" / "site-1")
    assert synthetic_record([sites[0], str(tmp_path / "elsewhere" / "site-1")]) is None  # two folders
    shutil.copytree(tmp_path / "fed" / "site-1", tmp_path / "fed" / "site-9")
    assert synthetic_record([*sites, str(tmp_path / "fed" / "site-9")]) is None  # not in the record
    (tmp_path / "fed" / FEDERATION_FILE).write_text("{not json")
    assert synthetic_record(sites) is None
    assert synthetic_record([]) is None


def test_frames_are_chosen_by_hash_distinct_patients_first_and_only_with_foreground() -> None:
    patients = ["a", "a", "a", "b", "b", "c"]
    drawable = np.array([True, True, False, True, True, False])
    two = chosen_frames("s", patients, drawable, 2)
    assert two == chosen_frames("s", patients, drawable, 2)  # deterministic
    assert {patients[i] for i in two} == {"a", "b"}
    every = chosen_frames("s", patients, drawable, 10)
    assert sorted(every) == [0, 1, 3, 4] and every[:2] == two  # never an undrawable frame
    assert chosen_frames("s", patients, np.zeros(6, dtype=bool), 2) == []


def test_the_report_embeds_only_this_runs_pngs_inside_its_folder(tmp_path) -> None:
    folder = tmp_path / OVERLAY_DIR
    folder.mkdir()
    (folder / "ok.png").write_bytes(PNG + b"rest")
    (folder / "fake.png").write_bytes(b"<script>")
    (tmp_path / "outside.png").write_bytes(PNG)
    entries = [{"site": "s", "patient": "p", "test_index": 0, "dice": 0.5, "hd95": None, "file": f}
               for f in ("ok.png", "fake.png", "../outside.png", "missing.png")]
    (folder / OVERLAY_INDEX).write_text(json.dumps({"run_id": "r1", "overlays": entries, "reason": None}))
    shown, reason = example_overlays(tmp_path, "r1")
    assert [s["png"] for s in shown] == [base64.b64encode(PNG + b"rest").decode("ascii")] and reason == ""
    assert shown[0]["caption"] == "s, test patient p, masked test image 0: Dice 0.500"
    assert example_overlays(tmp_path, "another run") == ([], NO_PIXELS)  # a reused folder's index
    assert example_overlays(tmp_path / "nothing", "r1") == ([], NO_PIXELS)
    (folder / OVERLAY_INDEX).write_text("{broken")
    shown, reason = example_overlays(tmp_path, "r1")
    assert shown == [] and reason.startswith("No example overlays: their index") and "\n" not in reason


def test_a_negative_number_of_overlays_is_refused_in_one_line() -> None:
    from fedir.config import Settings

    with pytest.raises(SettingsError) as info:
        Settings.from_run_config({"report.overlays": -1})
    assert str(info.value) == "report.overlays = -1 is out of range; it must be >= 0"
