"""Ingestion torture test: every pydicom test file and every shared DICOM file goes through
the site reader as its own one-row manifest. Each either loads as finite images of the
expected shape, one per frame, or is skipped with a documented reason; none raises, and
none that pydicom itself decodes is skipped. Plus the codecs, one transfer syntax each."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from fedir.client.imaging import SkipReason, UnreadableImage, read_display_frames
from fedir.client.manifest import write_manifest
from fedir.client.site import load_site
from tests.shared_data import XA_CINE, shared_data

SIZE = 16


def _torture_files() -> list[Path]:
    """pydicom's own test files (all of them, DICOM or not) and the shared DICOM files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that it cannot download its extras
        bundled = [Path(p) for p in get_testdata_files() if Path(p).is_file()]
    shared = sorted(p for p in shared_data().glob("dicom_*/**/*.dcm") if p.is_file())
    return bundled + shared


def _pydicom_frames(path: Path) -> int | None:
    """How many frames pydicom alone decodes from the file, or None when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - whatever pydicom raises, it "cannot decode"
        return None
    per_frame_dims = 3 if int(ds.get("SamplesPerPixel", 1)) > 1 else 2
    return pixels.shape[0] if pixels.ndim == per_frame_dims + 1 else 1


def _one_row_site(root: Path, source: Path) -> Path:
    """A site folder holding only `source` (copied: a link out of the folder is refused)."""
    root.mkdir(parents=True)
    shutil.copyfile(source, root / source.name)
    write_manifest(root, [{"patient_id": "P1", "path": source.name, "label": 1}])
    return root


def test_every_file_loads_or_is_skipped_with_a_documented_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _torture_files()
    assert len(files) > 150, "pydicom's test files or the shared data are missing"
    documented = {reason.value for reason in SkipReason}
    table: Counter[str] = Counter()
    wrongly_skipped: list[str] = []
    for index, source in enumerate(files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            site = load_site(_one_row_site(tmp_path / f"site-{index}", source),
                             image_size=SIZE, frame_policy="all")
        expected_frames = _pydicom_frames(source)
        if site.skipped:
            (skip,) = site.skipped
            assert skip.reason in documented, (source.name, skip.reason)
            table[skip.reason] += 1
            if expected_frames is not None:
                wrongly_skipped.append(f"{source.name}: {skip.reason}: {skip.detail}")
            continue
        images = site.split("train").images  # patient P1 lands in train
        assert images.shape == (expected_frames or 1, 1, SIZE, SIZE), source.name
        assert bool(np.isfinite(images.numpy()).all()), source.name
        table["loaded"] += 1
    with capsys.disabled():
        print(f"\ningestion torture test, {len(files)} files:")
        for outcome, count in table.most_common():
            print(f"  {outcome:<32} {count:>4}")
    assert not wrongly_skipped, "skipped although pydicom decodes them:\n" + "\n".join(wrongly_skipped)
    assert sum(table.values()) == len(files)


# The same MR image in every lossless transfer syntax: each must decode to the same
# display values as the uncompressed original.
LOSSLESS_MR = [
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pyjpegls / GDCM)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless (OpenJPEG)
]


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_lossless_syntaxes_decode_to_the_original_values(name: str) -> None:
    original = read_display_frames(Path(get_testdata_file("MR_small.dcm")))
    assert np.array_equal(read_display_frames(Path(get_testdata_file(name))), original)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", (1, 100, 100)),  # JPEG baseline (Pillow)
        ("SC_rgb_jpeg_gdcm.dcm", (1, 100, 100)),  # JPEG lossless, process 14 SV1 (GDCM)
        ("JPEGLSNearLossless_16.dcm", (1, 50, 10)),  # JPEG-LS near-lossless
        ("JPEG2000.dcm", (1, 1024, 256)),  # JPEG 2000 lossy
        ("image_dfl.dcm", (1, 512, 512)),  # deflated explicit VR little endian
    ],
)
def test_compressed_syntaxes_decode(name: str, shape: tuple[int, int, int]) -> None:
    frames = read_display_frames(Path(get_testdata_file(name)))
    assert frames.shape == shape and frames.std() > 0


def test_xa_cine_decodes_to_96_frames(tmp_path: Path) -> None:
    source = shared_data() / XA_CINE
    frames = read_display_frames(source)
    assert frames.shape == (96, 512, 512) and np.isfinite(frames).all()
    site = load_site(_one_row_site(tmp_path / "xa", source), image_size=SIZE, frame_policy="all")
    assert site.skipped == [] and site.split("train").images.shape == (96, 1, SIZE, SIZE)


def test_12bit_jpeg_extended_needs_the_gpl_codec_extra() -> None:
    """Only pylibjpeg-libjpeg (GPL, `pip install fedir[gpl-codecs]`) decodes 12-bit JPEG
    Extended; without it the file is skipped as an unsupported transfer syntax."""
    path = Path(get_testdata_file("JPGExtended.dcm"))
    if importlib.util.find_spec("libjpeg") is not None:
        assert read_display_frames(path).shape == (1, 1024, 256)
        return
    with pytest.raises(UnreadableImage) as info:
        read_display_frames(path)
    assert info.value.reason is SkipReason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "JPEG Extended" in info.value.detail
