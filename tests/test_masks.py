"""Masks at a site (client/masks.py, client/site.py): alignment with the image under every
frame policy and the resize, each bad mask skipped with its reason and counted, the cache."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import fedir.client.site as site_module
from fedir.client.manifest import ManifestError, write_manifest
from fedir.client.masks import MaskSkipReason
from fedir.client.site import load_site
from fedir.simulations.synthetic import generate_federation
from tests.dicom_factory import write_dicom

H, W, FRAMES, SIZE = 20, 24, 3, 10


def _cine() -> tuple[np.ndarray, np.ndarray]:
    """A 3-frame cine with a bright bar per frame (a different bar each frame, brightest in
    frame 1) and its exact labels: 1 on the bar, 2 on its left end."""
    pixels = np.full((FRAMES, H, W), 100, dtype=np.uint16)
    labels = np.zeros((FRAMES, H, W), dtype=np.uint8)
    for f in range(FRAMES):
        rows = slice(2 + 6 * f, 6 + 6 * f)
        pixels[f, rows, 4:20] = 1000 + 1000 * (f == 1)
        labels[f, rows, 4:20] = 1
        labels[f, rows, 4:8] = 2
    return pixels, labels


def _site(root: Path, rows: list[dict]) -> Path:
    pixels, _ = _cine()
    for row in rows:
        if not (root / row["path"]).exists():
            write_dicom(root / row["path"], pixels)
    write_manifest(root, rows)
    return root


def _all_items(site) -> tuple[torch.Tensor, list]:
    images = torch.cat([site.split(s).images for s in ("train", "val", "test")])
    masks = []
    for s in ("train", "val", "test"):
        part = site.split(s)
        masks += [None if i < 0 else part.masks[i] for i in part.mask_of.tolist()]
    return images, masks


def _expected(labels: np.ndarray) -> np.ndarray:
    from monai.transforms import Resize

    return np.asarray(Resize((SIZE, SIZE), mode="nearest-exact")(labels[None].astype(np.float32)))[0].astype(np.uint8)


@pytest.mark.parametrize("fmt", ["npy", "nifti"])
@pytest.mark.parametrize("policy", ["all", "every-2", "middle", "peak", "mip"])
def test_a_fully_outlined_cine_keeps_its_masks_aligned_under_every_policy(tmp_path: Path, fmt: str, policy: str) -> None:
    _, labels = _cine()
    root = tmp_path / "site"
    root.mkdir()
    if fmt == "npy":
        np.save(root / "m.npy", labels)
        mask = "m.npy"
    else:
        nib.save(nib.Nifti1Image(np.moveaxis(labels, 0, -1), np.eye(4)), root / "m.nii.gz")
        mask = "m.nii.gz"
    site = load_site(_site(root, [{"patient_id": "P1", "path": "c.dcm", "label": 1, "mask": mask}]),
                     image_size=SIZE, frame_policy=policy)
    images, masks = _all_items(site)
    picked = {"all": [0, 1, 2], "every-2": [0, 2], "middle": [1], "peak": [1], "mip": None}[policy]
    wanted = [labels[i] for i in picked] if picked else [labels.max(axis=0)]
    assert len(masks) == len(images) == len(wanted) and site.skipped == []
    for image, mask, labelmap in zip(images, masks, wanted):
        assert mask.shape == (1, SIZE, SIZE) and mask.dtype == torch.uint8
        assert np.array_equal(mask[0].numpy(), _expected(labelmap))
        # aligned: the bright bar of the resized image is where the resized mask is vessel
        assert image[0][mask[0] > 0].mean() > image[0][mask[0] == 0].mean() + 1.0


def test_volume_policy_resizes_the_mask_in_3d(tmp_path: Path) -> None:
    _, labels = _cine()
    root = tmp_path / "site"
    root.mkdir()
    np.save(root / "m.npy", labels)
    site = load_site(_site(root, [{"patient_id": "P1", "path": "c.dcm", "mask": "m.npy"}]),
                     image_size=SIZE, frame_policy="volume")
    _, masks = _all_items(site)
    assert masks[0].shape == (1, SIZE, SIZE, SIZE) and set(masks[0].unique().tolist()) == {0, 1, 2}


def test_a_partly_outlined_cine_labels_only_its_outlined_frames(tmp_path: Path) -> None:
    """One PNG outlining frame 2: under "all" only that frame has a mask; "mip" combines every
    frame, so the image has none; "peak" picks frame 1, not outlined."""
    _, labels = _cine()
    root = tmp_path / "site"
    root.mkdir()
    Image.fromarray(labels[2]).save(root / "m.png")
    rows = [{"patient_id": "P1", "path": "c.dcm", "mask": "m.png", "mask_frames": "2"}]
    _site(root, rows)
    _, masks = _all_items(load_site(root, image_size=SIZE, frame_policy="all"))
    assert [m is not None for m in masks] == [False, False, True]
    assert np.array_equal(masks[2][0].numpy(), _expected(labels[2]))
    for policy in ("mip", "peak"):
        _, masks = _all_items(load_site(root, image_size=SIZE, frame_policy=policy))
        assert masks == [None]


def test_the_synthetic_seg_is_read_and_equals_its_png(tmp_path: Path) -> None:
    generate_federation(tmp_path, sites=1, patients=3, seed=1, image_size=32, progress=False, mask_fraction=0.0)
    root = tmp_path / "site-0"
    site = load_site(root, image_size=32, frame_policy="all")
    assert site.skipped == []
    with (root / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sum(site.split(s).mask_count for s in ("train", "val", "test")) == len(rows)
    for row in rows:
        summary = site.mask_summaries[row["path"]]
        png = np.asarray(Image.open(root / f"masks/{Path(row['path']).stem}_f{row['mask_frames']}.png"))
        assert summary.frames == 1 and summary.foreground == [np.count_nonzero(png) / png.size]


def test_bad_masks_are_skipped_with_their_reason_and_the_image_kept(tmp_path: Path) -> None:
    generate_federation(tmp_path / "fed", sites=1, patients=2, seed=1, image_size=H, progress=False,
                        mask_fraction=0.0)
    with (tmp_path / "fed/site-0/manifest.csv").open() as fh:
        foreign_seg = next(csv.DictReader(fh))["mask"]
    root = tmp_path / "site"
    root.mkdir()
    _, labels = _cine()
    (root / "foreign.seg.dcm").write_bytes((tmp_path / "fed/site-0" / foreign_seg).read_bytes())
    (root / "garbage.png").write_bytes(b"not a png at all")
    Image.fromarray(labels[0][:, :20]).save(root / "narrow.png")
    Image.fromarray(np.full((H, W), 7, dtype=np.uint8)).save(root / "seven.png")
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(root / "rgb.png")
    np.save(root / "two.npy", labels[:2])
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(root / "empty.png")
    Image.fromarray(labels[0]).save(root / "good.png")
    cases = {  # mask cell, mask_frames cell -> expected reason (None: used)
        ("absent.png", "0"): MaskSkipReason.MISSING,
        ("garbage.png", "0"): MaskSkipReason.UNREADABLE,
        ("rgb.png", "0"): MaskSkipReason.UNREADABLE,
        ("narrow.png", "0"): MaskSkipReason.SIZE,
        ("seven.png", "0"): MaskSkipReason.LABELS,
        ("two.npy", ""): MaskSkipReason.FRAMES,
        ("good.png", "5"): MaskSkipReason.FRAMES,
        ("foreign.seg.dcm", ""): MaskSkipReason.OTHER_IMAGE,
        ("empty.png", "0"): None,
    }
    rows = [{"patient_id": f"P{i}", "path": f"img{i}.dcm", "mask": mask, "mask_frames": frames}
            for i, (mask, frames) in enumerate(cases)]
    site = load_site(_site(root, rows), image_size=SIZE, frame_policy="all")
    assert {s.path: s.reason for s in site.skipped} == {
        mask: reason.value for (mask, _), reason in cases.items() if reason is not None}
    images, masks = _all_items(site)
    assert len(images) == FRAMES * len(cases)  # every image kept, unlabelled where its mask is bad
    assert sum(m is not None for m in masks) == 1
    assert site.mask_summaries["img8.dcm"].all_background == 1


def test_masks_come_from_the_cache_and_a_touched_mask_is_read_again(tmp_path: Path, monkeypatch) -> None:
    _, labels = _cine()
    root = tmp_path / "site"
    root.mkdir()
    Image.fromarray(labels[1]).save(root / "m.png")
    _site(root, [{"patient_id": "P1", "path": "c.dcm", "mask": "m.png", "mask_frames": "1"}])
    first = _all_items(load_site(root, image_size=SIZE, frame_policy="all"))[1]
    real = site_module.load_labelled_image
    calls: list[Path] = []
    monkeypatch.setattr(site_module, "load_labelled_image", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    second = _all_items(load_site(root, image_size=SIZE, frame_policy="all"))[1]
    assert calls == [] and torch.equal(first[1], second[1]) and second[0] is None
    Image.fromarray(labels[1] * 0).save(root / "m.png")
    third = _all_items(load_site(root, image_size=SIZE, frame_policy="all"))[1]
    assert len(calls) == 1 and int(third[1].sum()) == 0


@pytest.mark.parametrize(("cells", "message"), [
    ({"mask": "../outside.png"}, "points outside the site folder"),
    ({"mask": "m.png", "mask_frames": "1;x"}, "not a list of distinct frame numbers"),
    ({"mask": "m.png", "mask_frames": "1;1"}, "not a list of distinct frame numbers"),
    ({"mask_frames": "1"}, "mask_frames without a mask"),
])
def test_manifest_mask_cells_that_make_the_manifest_invalid(tmp_path: Path, cells: dict, message: str) -> None:
    root = tmp_path / "site"
    root.mkdir()
    _site(root, [{"patient_id": "P1", "path": "c.dcm", **cells}])
    with pytest.raises(ManifestError, match=message) as info:
        load_site(root, image_size=SIZE)
    assert "outside.png" not in info.value.public and "row 2" in info.value.public


def test_data_card_counts_masks_suppresses_small_bins_and_check_reports_each_bad_mask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Six patients with a usable mask (foreground 0.2-0.5 of the frame), one all-background
    mask, one mask of the wrong size: the bins count patients, the single all-background
    patient is suppressed (with the next smallest bin, which its complement would reveal);
    the card sent in a round (card_once, from the decoded site) says the same as the check."""
    from flwr.app import Context, RecordDict

    from fedir.cli import main
    from fedir.client.datacard import build_card, card_once
    from fedir.client.datacheck import check_site
    from fedir.config import Settings

    _, labels = _cine()
    root = tmp_path / "site"
    root.mkdir()
    Image.fromarray(labels[0]).save(root / "good.png")
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(root / "empty.png")
    Image.fromarray(labels[0][:, :5]).save(root / "narrow.png")
    big = labels[0].copy()
    big[:, :] = 1
    Image.fromarray(big).save(root / "big.png")
    rows = [{"patient_id": f"P{i}", "path": f"img{i}.dcm", "label": 1, "mask": "good.png", "mask_frames": "0"}
            for i in range(6)]
    rows += [{"patient_id": "Q0", "path": "q0.dcm", "mask": "empty.png", "mask_frames": "1"},
             {"patient_id": "Q1", "path": "q1.dcm", "mask": "narrow.png", "mask_frames": "0"},
             {"patient_id": "Q2", "path": "q2.dcm", "mask": "big.png", "mask_frames": "2"},
             {"patient_id": "Q3", "path": "q3.dcm"}]
    _site(root, rows)
    check = check_site(root, progress=False)
    card = build_card(check.outcomes, val_fraction=0.15, test_fraction=0.25, k=5)
    assert card["masks"] == {
        "listed": 9, "runs_with_masks": 8, "frames_with_masks": 8, "patients_with_masks": 8,
        "all_background_frames": 1, "skipped": {MaskSkipReason.SIZE.value: 1},
        "foreground_fraction": {"values": {"0.1-0.2": 6}, "suppressed_cells": 2},
    }
    assert build_card(check.outcomes, val_fraction=0.15, test_fraction=0.25, k=1)["masks"]["foreground_fraction"][
        "values"] == {"0 (all background)": 1, "0.1-0.2": 6, ">=0.5": 1}
    site = load_site(root, image_size=SIZE, frame_policy="all")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert card_once(context, site, Settings())["masks"] == card["masks"]

    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "masks: 9 listed, 8 files with a usable mask (8 outlined frames, 8 patients), 1 skipped, " \
           "1 all-background frame(s) (kept)" in out
    assert "mask skipped, row 9, narrow.png: mask: size differs from its image: mask 20x5, image 20x24" in out
