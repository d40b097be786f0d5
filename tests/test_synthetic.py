"""The synthetic XA federation: valid DICOM, the reader-facing encodings, labels, caching."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from fedir.client.split import split_of
from fedir.simulations.synthetic import (
    XA_SOP_CLASS_UID,
    _add_lesions,
    _vessel_tree,
    encode_pixels,
    generate_federation,
    site_profile,
    vessel_labels,
)

SITES, PATIENTS, SIZE = 3, 6, 64


def _rows(root: Path, site: int) -> list[dict]:
    with (root / f"site-{site}" / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> list[Path]:
    return [root / f"site-{s}" / r["path"] for s in range(SITES) for r in _rows(root, s)]


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels as a reader shows them: modality LUT, MONOCHROME1 inverted, frames max-projected."""
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        pixels = slope * (2**ds.BitsStored - 1) + float(getattr(ds, "RescaleIntercept", 0.0)) - pixels
    return pixels.max(axis=0) if pixels.ndim == 3 else pixels


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fed")
    content = generate_federation(root, sites=SITES, patients=PATIENTS, seed=3,
                                  image_size=SIZE, progress=False)
    return root, content


def test_every_file_is_valid_xa(federation: tuple[Path, dict]) -> None:
    root, _ = federation
    frames = Counter()
    for path in _files(root):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == XA_SOP_CLASS_UID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "XA"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BitsStored in {10, 12} and ds.HighBit == ds.BitsStored - 1
        assert ds.pixel_array.max() < 2**ds.BitsStored
        assert str(ds.PatientName).startswith("SYNTH")
        frames["multi" if int(getattr(ds, "NumberOfFrames", 1)) > 1 else "single"] += 1
        if "NumberOfFrames" in ds:
            assert ds.pixel_array.shape == (ds.NumberOfFrames, SIZE, SIZE)
    assert frames["multi"] > 0 and frames["single"] > 0


def test_sites_have_distinct_scanners(federation: tuple[Path, dict]) -> None:
    root, content = federation
    makers = {pydicom.dcmread(root / f"site-{s}" / _rows(root, s)[0]["path"]).Manufacturer
              for s in range(SITES)}
    assert len(makers) == SITES
    assert {content["sites"][f"site-{s}"]["bits_stored"] for s in range(SITES)} == {10, 12}


def test_modality_lut_round_trip(federation: tuple[Path, dict]) -> None:
    root, _ = federation
    site = next(s for s in range(SITES) if site_profile(s).rescale is not None)
    slope, intercept = site_profile(site).rescale
    ds = pydicom.dcmread(root / f"site-{site}" / _rows(root, site)[0]["path"])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (slope, intercept)
    display = np.array([0.0, 0.25, 1.0])
    stored = encode_pixels(display, site_profile(site))
    rescaled = apply_modality_lut(stored, ds)
    expected = intercept + slope * np.rint(display * (2**ds.BitsStored - 1))
    np.testing.assert_allclose(rescaled, expected)
    assert float(apply_modality_lut(ds.pixel_array, ds).min()) >= intercept


def test_monochrome1_site_looks_like_the_others_after_inversion(
    federation: tuple[Path, dict],
) -> None:
    """Vessels (the brightest in-field pixels after handling) sit above the background at
    every site, including the MONOCHROME1 one, whose raw values are the other way round."""
    root, _ = federation
    photometric = {s: pydicom.dcmread(root / f"site-{s}" / _rows(root, s)[0]["path"])
                   .PhotometricInterpretation for s in range(SITES)}
    assert list(photometric.values()).count("MONOCHROME1") == 1
    for site in range(SITES):
        ds = pydicom.dcmread(root / f"site-{site}" / _rows(root, site)[0]["path"])
        image = _display(ds)
        centre = image[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4]
        top = 2**ds.BitsStored - 1
        lo, hi = apply_modality_lut(np.array([0, top]), ds)
        # background (median) in the lower half of the range, vessels well above it
        assert np.median(centre) < lo + 0.6 * (hi - lo), site
        assert np.percentile(centre, 99.5) - np.median(centre) > 0.1 * (hi - lo), site


def test_manifest_labels_and_splits(federation: tuple[Path, dict]) -> None:
    root, content = federation
    for site in range(SITES):
        rows = _rows(root, site)
        assert set(rows[0]) >= {"patient_id", "path", "label", "clin_age", "clin_sex"}
        for row in rows:
            assert row["patient_id"].startswith(f"S{site}-P")
            assert row["clin_sex"] in {"0", "1"} and 18 <= float(row["clin_age"]) <= 100
            if split_of(row["patient_id"]) != "train":
                assert row["label"] in {"0", "1"}
        per_patient = {}
        for row in rows:
            per_patient.setdefault(row["patient_id"], set()).add(row["label"])
        assert all(len(labels) == 1 for labels in per_patient.values())
        assert len(per_patient) == PATIENTS
        assert content["sites"][f"site-{site}"]["patients"] == PATIENTS


def test_unlabelled_fraction_applies_to_train_patients_only(tmp_path: Path) -> None:
    generate_federation(tmp_path, sites=3, patients=60, seed=1, image_size=16,
                        unlabelled_fraction=0.7, progress=False)
    train = {}
    for site in range(3):
        for row in _rows(tmp_path, site):
            if split_of(row["patient_id"]) == "train":
                train[row["patient_id"]] = row["label"]
            else:
                assert row["label"] != ""
    fraction = sum(v == "" for v in train.values()) / len(train)
    assert 0.55 < fraction < 0.85


def test_same_seed_same_files_and_cache_does_not_rewrite(
    federation: tuple[Path, dict], tmp_path: Path,
) -> None:
    root, content = federation
    mtimes = {p: p.stat().st_mtime_ns for p in _files(root)}
    again = generate_federation(root, sites=SITES, patients=PATIENTS, seed=3, image_size=SIZE,
                                progress=False)
    assert again == content
    assert {p: p.stat().st_mtime_ns for p in _files(root)} == mtimes

    other = tmp_path / "copy"
    generate_federation(other, sites=SITES, patients=PATIENTS, seed=3, image_size=SIZE,
                        progress=False)
    for site in range(SITES):
        assert _rows(other, site) == _rows(root, site)
    for path in _files(root):
        twin = other / path.relative_to(root)
        a, b = pydicom.dcmread(path), pydicom.dcmread(twin)
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert a.PixelData == b.PixelData


def test_parameters_change_regenerates(tmp_path: Path) -> None:
    first = generate_federation(tmp_path, sites=2, patients=3, seed=0, image_size=16,
                                progress=False)
    second = generate_federation(tmp_path, sites=2, patients=3, seed=1, image_size=16,
                                 progress=False)
    assert first["parameters"]["seed"] == 0 and second["parameters"]["seed"] == 1
    assert _rows(tmp_path, 0)  # rewritten, readable


def _prevalence(root: Path, site: int) -> float:
    labels = {r["patient_id"]: r["label"] for r in _rows(root, site)}
    return sum(v == "1" for v in labels.values()) / len(labels)


@pytest.mark.parametrize("confound", [0.0, 1.0])
def test_confound_controls_site_prevalence(tmp_path: Path, confound: float) -> None:
    generate_federation(tmp_path, sites=3, patients=60, seed=2, confound=confound,
                        unlabelled_fraction=0.0, image_size=16, progress=False)
    site0 = _prevalence(tmp_path, 0)
    others = np.mean([_prevalence(tmp_path, s) for s in (1, 2)])
    if confound == 1.0:
        assert site0 > 0.85 and others < 0.15
    else:
        assert abs(site0 - others) < 0.2 and 0.25 < others < 0.55


def _narrowing_by_label(label: int, seeds: range) -> tuple[list[float], list[float]]:
    """Per tree: the tightest trunk narrowing (1 - radius / untouched radius) and the
    faintest filling of any branch, after `_add_lesions` with that label."""
    tightest, faintest = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        vessels = _vessel_tree(rng, 256)
        before = [v.radius.copy() for v in vessels]
        _add_lesions(rng, vessels, label)
        tightest.append(max(float(1 - (v.radius / r0).min()) for v, r0 in zip(vessels, before) if v.level == 0))
        faintest.append(min(1.0 if v.opacity is None else float(v.opacity.min()) for v in vessels if v.level > 0))
    return tightest, faintest


def test_positive_trees_have_a_graded_significant_stenosis_and_negatives_do_not() -> None:
    """Every positive tree has a 60-95% trunk stenosis whose reduced filling reaches the
    branches downstream; a negative tree's irregularities stay mild and fill fully. The
    positives' severities spread over the range (graded, so some are subtle)."""
    pos_tight, pos_faint = _narrowing_by_label(1, range(60))
    neg_tight, neg_faint = _narrowing_by_label(0, range(60))
    assert all(0.6 - 1e-6 <= t <= 0.97 for t in pos_tight)
    assert min(pos_tight) < 0.66 and max(pos_tight) > 0.9 and np.percentile(pos_tight, 25) < 0.78
    assert max(neg_tight) < 0.55 and np.median(neg_tight) < 0.35
    assert all(f == 1.0 for f in neg_faint)
    assert np.mean([f < 0.95 for f in pos_faint]) > 0.5


# ---------------------------------------------------------------------------------------
# Masks (fedir data synth --masks / --mask-fraction)


def _segments_distance(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Distance of each grid point (N, 2) to the polyline `points`."""
    p0, d = points[:-1], points[1:] - points[:-1]
    rel = grid[:, None, :] - p0[None]
    t = np.clip((rel * d[None]).sum(-1) / np.maximum((d**2).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(rel - t[..., None] * d[None], axis=-1).min(axis=1)


@pytest.mark.parametrize("label", [0, 1])
def test_vessel_labels_are_the_drawn_geometry(label: int) -> None:
    """Centreline pixels are vessel (1 or 2); pixels beyond every vessel's radius are 0;
    a positive tree's stenosis centre is 2 and a negative tree has no 2."""
    size = 64
    rng = np.random.default_rng(7 + label)
    vessels = _vessel_tree(rng, size)
    _add_lesions(rng, vessels, label)
    labels = vessel_labels(vessels, size)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    for v in vessels:
        inside = np.all((v.points >= 0) & (v.points <= size - 1), axis=1)
        pts = np.rint(v.points[inside & (v.radius >= 0.75)]).astype(int)
        assert (labels[pts[:, 0], pts[:, 1]] > 0).all()
    grid = np.stack(np.mgrid[0:size, 0:size], -1).reshape(-1, 2).astype(float)
    far = np.ones(len(grid), dtype=bool)
    for v in vessels:
        far &= _segments_distance(v.points, grid) > float(v.radius.max()) + 1.0
    assert far.any() and (labels.reshape(-1)[far] == 0).all()
    lesions = [(v, first, last) for v in vessels for first, last, _ in v.lesions]
    assert bool(lesions) == (label == 1) and (2 in labels) == (label == 1)
    for v, first, last in lesions:
        r, c = np.rint(v.points[(first + last) // 2]).astype(int)
        if 0 <= r < size and 0 <= c < size:
            assert labels[r, c] == 2


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("masked")
    generate_federation(root, sites=2, patients=4, seed=5, image_size=SIZE, progress=False,
                        mask_fraction=0.0)
    return root


def test_seg_references_its_image_and_matches_the_png(masked: Path) -> None:
    import highdicom as hd

    for site in range(2):
        for row in _rows(masked, site):
            image = pydicom.dcmread(masked / f"site-{site}" / row["path"])
            frames = [int(f) for f in row["mask_frames"].split(";")]
            assert len(frames) == 1  # mask_fraction 0: one outlined frame per image
            seg = hd.seg.segread(masked / f"site-{site}" / row["mask"])
            assert seg.get_source_image_uids() == [
                (image.StudyInstanceUID, image.SeriesInstanceUID, image.SOPInstanceUID)]
            assert (seg.Rows, seg.Columns) == (image.Rows, image.Columns)
            spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            assert [float(x) for x in spacing] == [float(x) for x in image.ImagerPixelSpacing]
            labels = seg.get_pixels_by_source_frame(image.SOPInstanceUID, [f + 1 for f in frames],
                                                    combine_segments=True)
            png = np.asarray(Image.open(masked / f"site-{site}" / f"masks/{Path(row['path']).stem}_f{frames[0]}.png"))
            assert np.array_equal(labels[0], png)
            # the mask is where the iodine is: vessel pixels are brighter on the display than
            # the background in the collimated field (the corner pixel is the shutter's grey)
            display = _display(image)
            background = (png == 0) & (display != display[0, 0])
            assert display[png > 0].mean() > display[background].mean()


def test_one_outlined_frame_is_the_peak_and_masks_are_deterministic(masked: Path, tmp_path: Path) -> None:
    row = next(r for r in _rows(masked, 0) if int(getattr(pydicom.dcmread(masked / "site-0" / r["path"]),
                                                          "NumberOfFrames", 1)) > 1)
    ds = pydicom.dcmread(masked / "site-0" / row["path"])
    contrast = ds.pixel_array.reshape(int(ds.NumberOfFrames), -1).std(axis=1)
    assert row["mask_frames"] == str(int(np.argmax(contrast)))
    generate_federation(tmp_path, sites=2, patients=4, seed=5, image_size=SIZE, progress=False,
                        mask_fraction=0.0)
    for site in range(2):
        for r in _rows(masked, site):
            assert (masked / f"site-{site}" / r["mask"]).read_bytes() == (tmp_path / f"site-{site}" / r["mask"]).read_bytes()


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_mask_fraction_sets_the_outlined_frames(tmp_path: Path, fraction: float) -> None:
    content = generate_federation(tmp_path, sites=1, patients=6, seed=2, image_size=16, progress=False,
                                  mask_fraction=fraction)
    total = 0
    for row in _rows(tmp_path, 0):
        frames = int(getattr(pydicom.dcmread(tmp_path / "site-0" / row["path"]), "NumberOfFrames", 1))
        outlined = [int(f) for f in row["mask_frames"].split(";")]
        assert len(outlined) == max(1, round(fraction * frames)) and outlined == sorted(set(outlined))
        assert all(0 <= f < frames for f in outlined)
        total += len(outlined)
    assert content["sites"]["site-0"]["masked_frames"] == total
    assert content["sites"]["site-0"]["masked_images"] == len(_rows(tmp_path, 0))


def test_without_masks_the_manifest_has_no_mask_columns(federation: tuple[Path, dict]) -> None:
    root, content = federation
    assert "mask" not in _rows(root, 0)[0] and "mask_fraction" not in content["parameters"]
    assert not (root / "site-0" / "masks").exists()


def test_cli_masks_flag(tmp_path: Path) -> None:
    from fedir.cli import main

    assert main(["data", "synth", str(tmp_path), "--sites", "1", "--patients", "2", "--image-size", "16",
                 "--masks"]) == 0
    assert all(len(r["mask_frames"].split(";")) == 1 for r in _rows(tmp_path, 0))
    assert main(["data", "synth", str(tmp_path), "--sites", "1", "--patients", "2", "--image-size", "16",
                 "--mask-fraction", "1"]) == 0
    assert json.loads((tmp_path / "federation.json").read_text())["parameters"]["mask_fraction"] == 1.0


def test_every_row_is_dated_by_its_study_date(federation: tuple[Path, dict]) -> None:
    root, content = federation
    assert "scanner_change" not in content["parameters"]
    for site in range(SITES):
        for row in _rows(root, site):
            ds = pydicom.dcmread(root / f"site-{site}" / row["path"])
            assert row["acquired"].replace("-", "") == ds.StudyDate
            assert "2020-01-01" <= row["acquired"] <= "2024-12-31"


def test_a_scanner_change_alters_that_sites_later_images_only(federation: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = federation
    changed = tmp_path / "changed"
    date = "2022-01-01"
    content = generate_federation(changed, sites=SITES, patients=PATIENTS, seed=3, image_size=SIZE, progress=False,
                                  scanner_change=(1, date))
    assert content["parameters"]["scanner_change"] == {"site": 1, "date": date}
    after = 0
    for site in range(SITES):
        for old, new in zip(_rows(root, site), _rows(changed, site)):
            assert old == new  # the same rows, dates and labels
            a = pydicom.dcmread(root / f"site-{site}" / old["path"])
            b = pydicom.dcmread(changed / f"site-{site}" / new["path"])
            is_after = site == 1 and new["acquired"] >= date
            after += is_after
            assert np.array_equal(a.pixel_array, b.pixel_array) is not is_after
            assert b.ManufacturerModelName == (f"{a.ManufacturerModelName} (replaced)" if is_after
                                               else a.ManufacturerModelName)
            if is_after:  # the replaced detector is noisier: the background's pixel-to-pixel spread grows
                def spread(ds: pydicom.Dataset) -> float:  # one frame, inside the collimated field
                    frame = apply_modality_lut(ds.pixel_array, ds).astype(np.float64).reshape(-1, SIZE, SIZE)[0]
                    return float(np.diff(frame[SIZE // 4:-SIZE // 4, SIZE // 4:-SIZE // 4], axis=-1).std())
                assert spread(b) > 2 * spread(a)
    assert after > 0


@pytest.mark.parametrize(("value", "message"), [
    ("1-2022-01-01", "is not SITE:YYYY-MM-DD"),
    ("x:2022-01-01", "is not SITE:YYYY-MM-DD"),
    ("5:2022-01-01", "the federation has sites 0..0"),
    ("site-0:2022-13-01", "is not YYYY-MM-DD"),
])
def test_cli_scanner_change_refuses_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture, value: str,
                                               message: str) -> None:
    from fedir.cli import main

    try:  # argparse refuses the form (SystemExit), the command a site outside the federation (UserError)
        code = main(["data", "synth", str(tmp_path), "--sites", "1", "--patients", "2", "--image-size", "16",
                     "--scanner-change", value])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "site-0").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--sites", "0"], "(--sites, --patients) must be at least 1, got 0 and 2"),
    (["--patients", "0"], "(--sites, --patients) must be at least 1, got 1 and 0"),
    (["--confound", "1.5"], "(--confound) must be in [0, 1]"),
    (["--unlabelled", "-0.1"], "(--unlabelled) must be in [0, 1]"),
    (["--image-size", "8"], "(--image-size) must be at least 16"),
    (["--masks", "--mask-fraction", "2"], "(--mask-fraction) must be in [0, 1]"),
])
def test_cli_synth_refuses_out_of_range_parameters(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   args: list[str], message: str) -> None:
    """A parameter outside its range is one line naming the option, exit 2, nothing written."""
    from fedir.cli import main

    base = {"--sites": "1", "--patients": "2", "--image-size": "16"}
    for key in args[::2]:
        base.pop(key, None)
    argv = ["data", "synth", str(tmp_path / "fed")] + [x for kv in base.items() for x in kv] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fed").exists()
