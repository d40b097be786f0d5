"""Bad input at a site, each case with the message a hospital's IT person gets.

A broken manifest is the site's configuration: reading it raises ManifestError with the
file and row, and a path-free `public` text that is all the server may see. A broken
image is skipped with its reason while the rest of the site loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedir.client.imaging import SkipReason
from fedir.client.manifest import ManifestError, read_manifest, write_manifest
from fedir.client.site import load_site
from tests.dicom_factory import write_dicom

SIZE = 16
# A file name a careless export might use: it must never reach a public message.
PHI_NAME = "DOE_JOHN_19450317"


def _good_site(root: Path, patients: int = 4) -> Path:
    for i in range(patients):
        write_dicom(root / f"img/p{i}.dcm", np.full((8, 8), i * 100 + 1))
    write_manifest(root, [{"patient_id": f"P{i}", "path": f"img/p{i}.dcm", "label": i % 2}
                          for i in range(patients)])
    return root


def _manifest_error(root: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_site(root, image_size=SIZE)
    assert str(root) not in info.value.public and PHI_NAME not in info.value.public
    assert info.value.public.startswith("manifest.csv: ")
    return info.value


def test_empty_site_folder(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    error = _manifest_error(root)
    assert "no manifest.csv in the site folder" in str(error) and str(root) in str(error)


def test_duplicated_path(tmp_path: Path) -> None:
    root = _good_site(tmp_path / "site")
    with (root / "manifest.csv").open("a") as fh:
        fh.write("P9,./img/p1.dcm,1\n")  # the same file, spelt differently
    error = _manifest_error(root)
    assert "row 6: path './img/p1.dcm' is listed again (first at row 3)" in str(error)
    assert error.public == "manifest.csv: row 6: a path is listed again (first at row 3)"


@pytest.mark.parametrize("label", ["2", "-1", "0.5", "yes"])
def test_label_outside_the_declared_classes(tmp_path: Path, label: str) -> None:
    root = _good_site(tmp_path / "site")
    with (root / "manifest.csv").open("a") as fh:
        fh.write(f"{PHI_NAME},img/p0b.dcm,{label}\n")
    error = _manifest_error(root)
    assert f"row 6: label '{label}'" in str(error) and "row 6" in error.public


def test_label_classes_follow_the_task(tmp_path: Path) -> None:
    root = _good_site(tmp_path / "site")
    with (root / "manifest.csv").open("a") as fh:
        fh.write("P9,img/p9.dcm,2\n")
    with pytest.raises(ManifestError, match=r"outside the task's classes 0\.\.1"):
        read_manifest(root, num_classes=2)
    assert [r.label for r in read_manifest(root, num_classes=3)][-1] == 2


def test_non_utf8_byte(tmp_path: Path) -> None:
    root = _good_site(tmp_path / "site")
    with (root / "manifest.csv").open("ab") as fh:
        fh.write("M\u00fcller,img/p0.dcm,1\n".encode("latin-1"))  # a Windows export
    error = _manifest_error(root)
    assert "row 6: not UTF-8 text (byte 0xfc" in str(error) and "save the file as UTF-8" in str(error)
    assert error.public == "manifest.csv: row 6: not UTF-8 text"


def test_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = _good_site(tmp_path / "site")
    outside = write_dicom(tmp_path / "elsewhere" / f"{PHI_NAME}.dcm", np.ones((8, 8)))
    (root / "img" / f"{PHI_NAME}.dcm").symlink_to(outside)
    with (root / "manifest.csv").open("a") as fh:
        fh.write(f"P9,img/{PHI_NAME}.dcm,1\n")
    error = _manifest_error(root)
    assert "points outside the site folder" in str(error) and PHI_NAME in str(error)


def test_zero_byte_dicom_and_jpeg_renamed_dcm_are_skipped_the_rest_loads(tmp_path: Path) -> None:
    root = _good_site(tmp_path / "site")
    (root / "img/zero.dcm").touch()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "img/photo.jpg")
    (root / "img/photo.jpg").rename(root / "img/photo.dcm")
    with (root / "manifest.csv").open("a") as fh:
        fh.write("P8,img/zero.dcm,0\nP9,img/photo.dcm,1\n")
    site = load_site(root, image_size=SIZE)
    assert {(s.path, s.reason) for s in site.skipped} == {
        ("img/zero.dcm", SkipReason.EMPTY.value),
        ("img/photo.dcm", SkipReason.NOT_DICOM.value),
    }
    assert len(site.train) + len(site.val) + len(site.test) == 4
