"""fedir.client.imaging: display mapping, frame policies, model input and skip reasons."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset

from fedir.client.imaging import (
    FRAME_POLICIES,
    SkipReason,
    UnreadableImage,
    apply_frame_policy,
    load_image,
    read_display_frames,
    to_model_input,
)
from tests.dicom_factory import write_dicom


def _ramp(h: int = 8, w: int = 6) -> np.ndarray:
    """Distinct stored values 0..h*w-1, so orderings can be checked pixel by pixel."""
    return np.arange(h * w, dtype=np.uint16).reshape(h, w)


def _reason(path: Path) -> SkipReason:
    with pytest.raises(UnreadableImage) as info:
        load_image(path, 16)
    return info.value.reason


def test_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    pixels = _ramp()
    pixels[0, 0] = 100
    frames = read_display_frames(write_dicom(tmp_path / "a.dcm", pixels, slope=2, intercept=-50))
    assert frames.shape == (1, 8, 6) and frames.dtype == np.float32
    assert frames[0, 0, 0] == 150.0


def test_monochrome1_inverted(tmp_path: Path) -> None:
    pixels = _ramp()
    mono2 = read_display_frames(write_dicom(tmp_path / "m2.dcm", pixels))[0]
    mono1 = read_display_frames(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))[0]
    brightest = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert mono1[brightest] == mono1.min()
    assert np.array_equal(np.argsort(mono1, axis=None), np.argsort(-mono2, axis=None))


def test_voi_window_applied(tmp_path: Path) -> None:
    pixels = np.full((4, 4), 1000, dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 4000
    raw = read_display_frames(write_dicom(tmp_path / "raw.dcm", pixels))[0]
    windowed = read_display_frames(write_dicom(tmp_path / "w.dcm", pixels, window=(1000, 200)))[0]
    assert raw[0, 1] == 4000.0
    # Outside the window: clipped to the ends of the 16-bit output range; the centre
    # lands mid-range (a linear window, PS3.3 C.11.2.1.2).
    assert windowed[0, 0] == 0.0 and windowed[0, 1] == 65535.0
    assert windowed[1, 1] == pytest.approx(65535 / 2, rel=0.01)


def test_frame_policies_shapes(tmp_path: Path) -> None:
    stack = np.zeros((5, 8, 8), dtype=np.uint16)
    stack[3, ::2] = 1000  # frame 3 has the most contrast
    stack[:, 0, 0] = np.arange(5) * 10
    frames = read_display_frames(write_dicom(tmp_path / "cine.dcm", stack))
    assert frames.shape == (5, 8, 8)
    assert apply_frame_policy(frames, "all").shape == (5, 8, 8)
    assert np.array_equal(apply_frame_policy(frames, "middle")[0], frames[2])
    assert np.array_equal(apply_frame_policy(frames, "peak")[0], frames[3])
    assert np.array_equal(apply_frame_policy(frames, "mip")[0], frames.max(axis=0))
    for policy in FRAME_POLICIES:
        out = load_image(tmp_path / "cine.dcm", 16, policy)
        expected = {"all": (5, 1, 16, 16), "volume": (1, 1, 16, 16, 16)}.get(policy, (1, 1, 16, 16))
        assert out.shape == expected
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_unknown_policy_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frame policy"):
        load_image(write_dicom(tmp_path / "a.dcm", _ramp()), 16, "brightest")


def test_model_input_is_zscored_and_finite() -> None:
    rng = np.random.default_rng(0)
    out = to_model_input(rng.uniform(0, 4000, (2, 40, 30)).astype(np.float32), 16)
    assert out.shape == (2, 1, 16, 16)
    assert np.allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    assert np.allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-2)
    constant = to_model_input(np.full((1, 10, 10), 7.0, dtype=np.float32), 16)
    assert np.array_equal(constant, np.zeros((1, 1, 16, 16), dtype=np.float32))


def test_png_and_npy_load(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "cine.npy", np.random.default_rng(0).random((3, 8, 8)))
    assert np.array_equal(read_display_frames(tmp_path / "g.png")[0], grey.astype(np.float32))
    assert np.allclose(read_display_frames(tmp_path / "rgb.png")[0], grey, atol=0.01)
    assert load_image(tmp_path / "g.png", 16).shape == (1, 1, 16, 16)
    assert load_image(tmp_path / "cine.npy", 16, "all").shape == (3, 1, 16, 16)


def test_skip_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").touch()
    (tmp_path / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "picture.png")
    (tmp_path / "picture.dcm").write_bytes((tmp_path / "picture.png").read_bytes())
    whole = write_dicom(tmp_path / "whole.dcm", np.ones((64, 64), dtype=np.uint16)).read_bytes()
    (tmp_path / "half.dcm").write_bytes(whole[: len(whole) // 2])
    np.save(tmp_path / "volume.npy", np.zeros((2, 3, 4, 5)))
    (tmp_path / "notes.txt").write_text("hello")
    expected = {
        "absent.dcm": SkipReason.MISSING,
        "empty.dcm": SkipReason.EMPTY,
        "random.dcm": SkipReason.NOT_DICOM,
        "picture.dcm": SkipReason.NOT_DICOM,
        # The header survives the cut, the pixel data does not: pydicom reads a short
        # Pixel Data element, which decoding reports as fewer bytes than expected.
        "half.dcm": SkipReason.TRUNCATED,
        "header.dcm": SkipReason.NO_PIXEL_DATA,
        "volume.npy": SkipReason.NOT_AN_IMAGE,
        "notes.txt": SkipReason.UNSUPPORTED_FORMAT,
    }
    write_dicom(tmp_path / "header.dcm", None)
    assert {name: _reason(tmp_path / name) for name in expected} == expected


def test_pydicom_test_files_never_raise_anything_else() -> None:
    """A broad sanity loop: every pydicom test file either loads or is skipped with a reason."""
    table: collections.Counter[str] = collections.Counter()
    for name in get_testdata_files():
        try:
            out = load_image(Path(name), 16)
        except UnreadableImage as exc:
            table[exc.reason.value] += 1
        else:
            assert out.shape[1:] == (1, 16, 16) and np.isfinite(out).all(), name
            table["loaded"] += 1
    print("\npydicom test files:", dict(table.most_common()))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert load_image(Path(get_testdata_file(name)), 16).shape == (1, 1, 16, 16)


def test_enhanced_multiframe_rescale_read_from_functional_groups(tmp_path: Path) -> None:
    """Enhanced files keep the rescale in functional groups, where pydicom's LUT does not
    look: shared slope 2, intercept 10, overridden to slope 1, intercept 0 for frame 1."""
    def transform(slope: float, intercept: float) -> Dataset:
        item = Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        group = Dataset()
        group.PixelValueTransformationSequence = [item]
        return group

    path = write_dicom(tmp_path / "enh.dcm", np.full((2, 4, 4), 100, dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.SharedFunctionalGroupsSequence = [transform(2, 10)]
    ds.PerFrameFunctionalGroupsSequence = [Dataset(), transform(1, 0)]
    ds.save_as(path)
    frames = read_display_frames(path)
    assert frames[0, 0, 0] == 210.0 and frames[1, 0, 0] == 100.0
