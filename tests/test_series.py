"""Series folders (one DICOM slice per file) and frame policies over frames and slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedir.client.imaging import SkipReason, apply_frame_policy, load_image, read_display_frames
from fedir.client.manifest import write_manifest
from fedir.client.site import load_site
from fedir.client.split import split_of
from tests.dicom_factory import write_dicom

SIZE = 8


def _series(folder: Path, z_positions: list[float], *, oblique: bool = False) -> Path:
    """One slice per z; slice i's pixels all equal 100 * (its rank along z) + 1; file
    names run against the position order, so sorting by name would be wrong."""
    ranks = {z: rank for rank, z in enumerate(sorted(z_positions))}
    for i, z in enumerate(z_positions):
        path = write_dicom(folder / f"slice{len(z_positions) - i:03d}.dcm",
                           np.full((6, 6), 100 * ranks[z] + 1))
        ds = pydicom.dcmread(path)
        # An oblique stack: the normal is (0, -1, 1)/sqrt(2), so z alone would mislead.
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 1] if oblique else [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, -z, z] if oblique else [0, 0, z]
        ds.InstanceNumber = 100 - i
        ds.save_as(path)
    return folder


def test_series_slices_are_sorted_by_position(tmp_path: Path) -> None:
    frames = read_display_frames(_series(tmp_path / "s", [20.0, -5.0, 7.5, 0.0, 12.0]))
    assert frames.shape == (5, 6, 6)
    assert [int(f[0, 0]) for f in frames] == [1, 101, 201, 301, 401]


def test_oblique_series_sorted_along_the_normal(tmp_path: Path) -> None:
    frames = read_display_frames(_series(tmp_path / "s", [3.0, 1.0, 2.0], oblique=True))
    assert [int(f[0, 0]) for f in frames] == [1, 101, 201]


def test_policies_over_slices(tmp_path: Path) -> None:
    frames = read_display_frames(_series(tmp_path / "s", [float(z) for z in range(7)]))
    assert int(apply_frame_policy(frames, "middle")[0, 0, 0]) == 301
    assert [int(f[0, 0]) for f in apply_frame_policy(frames, "every-3")] == [1, 301, 601]
    assert int(apply_frame_policy(frames, "mip")[0, 0, 0]) == 601
    assert load_image(tmp_path / "s", SIZE, "all").shape == (7, 1, SIZE, SIZE)
    for bad in ("every-0", "every-x", "every-"):
        with pytest.raises(ValueError, match="frame policy"):
            load_image(tmp_path / "s", SIZE, bad)


def test_a_bad_slice_makes_the_series_unusable(tmp_path: Path) -> None:
    folder = _series(tmp_path / "s", [0.0, 1.0, 2.0])
    (folder / "slice002.dcm").write_bytes(b"")
    root = tmp_path
    write_manifest(root, [{"patient_id": "P1", "path": "s", "label": 1}])
    site = load_site(root, image_size=SIZE)
    (skip,) = site.skipped
    assert skip.path == "s" and skip.reason == SkipReason.EMPTY.value and "slice002.dcm" in skip.detail


def test_frames_and_slices_of_a_patient_never_cross_splits(tmp_path: Path) -> None:
    root = tmp_path / "site"
    rows = []
    for p in range(12):
        _series(root / f"p{p}/ct", [0.0, 1.0, 2.0, 3.0])
        write_dicom(root / f"p{p}/cine.dcm", np.full((3, 6, 6), p + 1))
        rows += [{"patient_id": f"P{p}", "path": f"p{p}/ct", "label": p % 2},
                 {"patient_id": f"P{p}", "path": f"p{p}/cine.dcm", "label": p % 2}]
    write_manifest(root, rows)
    site = load_site(root, image_size=SIZE, frame_policy="all")
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for patient in site.split(split).patients:
            assert seen.setdefault(patient, split) == split
            assert split_of(patient) == split
    assert len(seen) == 12
    assert sum(len(site.split(s)) for s in ("train", "val", "test")) == 12 * (4 + 3)
