"""One image file -> a model-ready float array, or a documented reason why not.

Three stages, each its own function so that tests and the data card can use them apart:

1. `read_display_frames`: the file as a radiologist's screen would show it, as float32
   frames (F, H, W) where a higher value is always brighter. DICOM goes through pydicom
   directly, not MONAI's `PydicomReader`, because that reader applies no VOI window, does
   not invert MONOCHROME1, ignores the rescale of Enhanced multi-frame files and returns
   multi-frame files with the frame axis in the middle (docs/design.md, "Facts").
2. `apply_frame_policy`: frames -> the images the model sees (one, or one per frame).
3. `to_model_input`: MONAI `Resize` to S x S and a per-image z-score (`NormalizeIntensity`).

A file that cannot be used raises `UnreadableImage` with a `SkipReason`; the site reader
records the reason and goes on, because one bad file must never crash a federated round.
"""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from fedir.config import FramePolicy, allowed, frame_policy_ok

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ""})
PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
NUMPY_SUFFIXES = frozenset({".npy"})
_DICOM_MAGIC_OFFSET = 128
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# ITU-R BT.601 luma weights: what a greyscale display of an RGB image shows.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class SkipReason(str, enum.Enum):
    """Why a file was skipped; the values are what a site's data card and logs show."""

    MISSING = "missing file"
    EMPTY = "empty file"
    NOT_DICOM = "not a DICOM file"
    NO_PIXEL_DATA = "no pixel data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported transfer syntax"
    TRUNCATED = "truncated"
    DECODE_ERROR = "pixel data cannot be decoded"
    NOT_AN_IMAGE = "not a 2D image"
    UNSUPPORTED_FORMAT = "unsupported file format"


class UnreadableImage(Exception):
    """A file that cannot become a model input; `reason` is a SkipReason, `detail` free text."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


FRAME_POLICIES = allowed(FramePolicy)
"""How the frames (F, H, W) of a file, or the slices of a series folder, become model images:

- "mip": maximum-intensity projection over frames of the display image (higher =
  brighter), i.e. per pixel the brightest value it takes in the cine. Literal MIP: in
  angiography, where iodine-filled vessels are dark on the display, it keeps the
  background and drops the vessels; use "peak" for such cines.
- "middle": the frame at index F // 2.
- "all": every frame, each its own image (same patient and label).
- "peak": the single frame with the highest contrast, measured as the largest standard
  deviation of its display intensities (first one on ties): in a contrast run, the frame
  where the vessels are most opacified.
- "every-K" (K a positive integer, e.g. "every-4"): frames 0, K, 2K, ..., each its own
  image: a sample of a long cine or of a series' slices.
- "volume": the frames (or a series' slices, or a 3D .npy) stay one 3D image, resized
  to S x S x S, for a 3D network (`spatial_dims_of`; e.g. VesselMNIST3D).
For a single-frame file every policy but "volume" returns that frame. A series folder's slices are
frames in position order, so "middle" is the middle slice, "mip" a maximum-intensity
projection through the volume and "all"/"every-K" 2D slices. Every image of a file or
series keeps its row's patient, so frames and slices never cross splits.
"""


# ---------------------------------------------------------------------------------------
# Stage 1: file -> display frames


def read_display_frames(path: Path) -> np.ndarray:
    """Read one image file as float32 display frames (F, H, W), higher = brighter.

    The format is chosen by suffix (.dcm/.dicom/.ima/none: DICOM; .png/.jpg/.jpeg: Pillow;
    .npy: NumPy, 2D = one frame, 3D = frames); any other suffix is read as DICOM only when
    the file carries the 'DICM' marker (UID-named DICOM files have suffixes like '.1').
    A folder is a DICOM series: its slices, in position order, are the frames.
    Raises UnreadableImage, and nothing else, for a file that cannot be used.
    """
    path = Path(path)
    if path.is_dir():
        return _finite_frames(_as_frames(_read_series(path)))
    _check_present(path)
    suffix = path.suffix.lower()
    if suffix in PILLOW_SUFFIXES:
        frames = _read_pillow(path)
    elif suffix in NUMPY_SUFFIXES:
        frames = _read_numpy(path)
    elif suffix in DICOM_SUFFIXES or _has_dicom_magic(path):
        frames = _read_dicom(path)
    else:
        raise UnreadableImage(SkipReason.UNSUPPORTED_FORMAT, f"suffix {path.suffix!r}")
    return _finite_frames(_as_frames(frames))


def _check_present(path: Path) -> None:
    """Tell a missing or empty file apart from a broken one: they have different fixes."""
    if not path.exists():
        raise UnreadableImage(SkipReason.MISSING, str(path))
    if path.stat().st_size == 0:
        raise UnreadableImage(SkipReason.EMPTY, "0 bytes")


def _read_series(folder: Path) -> np.ndarray:
    """A series folder (one DICOM slice per file) -> display slices (S, H, W) in position
    order: along the slice normal (ImageOrientationPatient x ImagePositionPatient), else
    by InstanceNumber, else by file name. Hidden files are ignored; a slice that cannot be
    read, a link out of the folder, or slices of different sizes make the series unusable,
    since a volume with a hole is not the patient's anatomy."""
    inside = folder.resolve()
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not files:
        raise UnreadableImage(SkipReason.NOT_AN_IMAGE, "empty series folder")
    slices = []
    for file in files:
        if not file.resolve().is_relative_to(inside) or not file.is_file():
            raise UnreadableImage(SkipReason.UNSUPPORTED_FORMAT,
                                  f"{file.name}: not a file of the series folder")
        try:
            _check_present(file)
            ds = _read_dataset(file)
            frames = _as_frames(_read_dicom_dataset(ds))
        except UnreadableImage as exc:
            raise UnreadableImage(exc.reason, f"slice {file.name}: {exc.detail}") from None
        slices.append((_slice_order(ds, file), frames))
    shapes = {frames.shape[1:] for _, frames in slices}
    if len(shapes) > 1:
        raise UnreadableImage(SkipReason.NOT_AN_IMAGE, f"slices of different sizes {sorted(shapes)}")
    slices.sort(key=lambda item: item[0])
    return np.concatenate([frames for _, frames in slices])


def _slice_order(ds: Dataset, file: Path) -> tuple[float, float, str]:
    """Sort key of a slice: position along the normal, instance number, file name."""
    try:
        row, col = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
        position = float(np.dot(np.cross(row, col), np.asarray(ds.ImagePositionPatient, dtype=float)))
    except (AttributeError, ValueError, TypeError):
        position = 0.0
    return position, float(ds.get("InstanceNumber") or 0), file.name


def _has_dicom_magic(path: Path) -> bool:
    """True when the file has the DICOM Part 10 'DICM' marker after the 128-byte preamble."""
    with path.open("rb") as fh:
        fh.seek(_DICOM_MAGIC_OFFSET)
        return fh.read(4) == b"DICM"


def _read_pillow(path: Path) -> np.ndarray:
    """PNG/JPEG -> (H, W) luminance; 16-bit greyscale PNGs keep their full range."""
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                img = img.convert("RGB")
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableImage(SkipReason.DECODE_ERROR, f"Pillow: {exc}") from None
    return _luminance(pixels) if pixels.ndim == 3 else pixels


def _read_numpy(path: Path) -> np.ndarray:
    """A .npy array: (H, W) or (F, H, W) of numbers; pickled objects are refused."""
    try:
        pixels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UnreadableImage(SkipReason.DECODE_ERROR, f"NumPy: {exc}") from None
    if not isinstance(pixels, np.ndarray) or pixels.dtype.kind not in "biuf":
        raise UnreadableImage(SkipReason.NOT_AN_IMAGE, f"array of dtype {pixels.dtype}")
    return pixels


def _read_dicom(path: Path) -> np.ndarray:
    """DICOM -> display frames: decode, then modality LUT, VOI, inversion, colour -> luma."""
    return _read_dicom_dataset(_read_dataset(path))


def _read_dicom_dataset(ds: Dataset) -> np.ndarray:
    """A parsed dataset -> display frames (see _read_dicom)."""
    pixels = _decode_pixels(ds)
    try:
        return _display_mapping(ds, pixels)
    except Exception as exc:  # noqa: BLE001 - malformed LUT/window tags come in many types
        raise UnreadableImage(
            SkipReason.DECODE_ERROR, f"display mapping failed: {type(exc).__name__}: {exc}"
        ) from None


def _read_dataset(path: Path) -> Dataset:
    """Parse the header; force=False so that non-DICOM bytes are refused, not guessed at."""
    try:
        ds = pydicom.dcmread(path, force=False)
    except InvalidDicomError as exc:
        raise UnreadableImage(SkipReason.NOT_DICOM, str(exc)) from None
    except EOFError as exc:
        raise UnreadableImage(SkipReason.TRUNCATED, f"header: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt headers
        raise UnreadableImage(
            SkipReason.DECODE_ERROR, f"header cannot be parsed: {type(exc).__name__}: {exc}"
        ) from None
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise UnreadableImage(SkipReason.NO_PIXEL_DATA, f"SOP class {ds.get('SOPClassUID', '?')}")
    return ds


def _decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode the pixel data, mapping pydicom's failures onto skip reasons."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return ds.pixel_array
    except NotImplementedError as exc:
        raise UnreadableImage(SkipReason.UNSUPPORTED_TRANSFER_SYNTAX, str(exc)) from None
    except RuntimeError as exc:
        reason = (
            SkipReason.UNSUPPORTED_TRANSFER_SYNTAX
            if _no_plugin_supports(str(exc))
            else SkipReason.DECODE_ERROR
        )
        name = syntax.name if syntax is not None else "no transfer syntax"
        detail = "; ".join(line.strip() for line in str(exc).strip().splitlines()[1:])
        raise UnreadableImage(reason, f"{name}: {detail or _first_line(exc)}") from None
    except ValueError as exc:
        short = "less than expected" in str(exc)
        reason = SkipReason.TRUNCATED if short else SkipReason.DECODE_ERROR
        raise UnreadableImage(reason, _first_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - decoders and tag parsing raise many types
        raise UnreadableImage(
            SkipReason.DECODE_ERROR, f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _no_plugin_supports(message: str) -> bool:
    """True when pydicom says that no installed plugin handles this kind of data (every
    plugin lacks a dependency, or each declines the encoding, e.g. 12-bit JPEG Extended
    without the GPL codec extra); False when a plugin tried and the data were bad."""
    if "missing dependencies" in message:
        return True
    plugins = [line for line in message.strip().splitlines()[1:] if line.strip()]
    return bool(plugins) and all("does not support" in line for line in plugins)


def _first_line(exc: BaseException) -> str:
    """pydicom's messages can list every plugin; the first line is the useful one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _display_mapping(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> what the screen shows: grey images get modality LUT, VOI window and
    inversion; colour images (RGB or palette) become luminance."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        return _luminance(apply_color_lut(pixels, ds))
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        return _luminance(pixels)
    display = _grey_display(ds, pixels, frames)
    if photometric == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        display = display.max() + display.min() - display
    return display


def _grey_display(ds: Dataset, pixels: np.ndarray, frames: int) -> np.ndarray:
    """Modality LUT then VOI LUT/window, per frame where an Enhanced file sets them per frame."""
    views = _frame_views(ds, frames)
    if views is None:
        return apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
    stack = pixels if frames > 1 else pixels[None]
    mapped = [
        apply_voi_lut(apply_modality_lut(frame, view), view).astype(np.float32)
        for frame, view in zip(stack, views)
    ]
    return np.stack(mapped)


_TOP_LEVEL_LUT_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)
_FRAME_LUT_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _frame_views(ds: Dataset, frames: int) -> list[Dataset] | None:
    """For Enhanced multi-frame files, one small dataset per frame holding the rescale and
    window that apply to it (shared functional groups, overridden per frame): pydicom's LUT
    functions read top-level tags only. None when the file has no functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return None
    views = []
    for index in range(frames):
        view = Dataset()
        for keyword in _TOP_LEVEL_LUT_KEYWORDS:
            if keyword in ds:
                view[keyword] = ds[keyword]
        own = per_frame[index] if per_frame and index < len(per_frame) else None
        for group in filter(None, [shared[0] if shared else None, own]):
            for macro in _FRAME_LUT_MACROS:
                if group.get(macro):
                    for element in group[macro][0]:
                        view[element.tag] = element
        views.append(view)
    return views


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) colour -> (...) luminance; an alpha channel is dropped."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


def _as_frames(pixels: np.ndarray) -> np.ndarray:
    """Any reader's output -> float32 (F, H, W); anything else is not a 2D image."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or min(pixels.shape) < 1 or min(pixels.shape[1:]) < 2:
        raise UnreadableImage(SkipReason.NOT_AN_IMAGE, f"array of shape {pixels.shape}")
    return pixels.astype(np.float32, copy=False)


def _finite_frames(frames: np.ndarray) -> np.ndarray:
    """Replace NaN/inf by the lowest finite value (background), so the model input is
    finite; a file with no finite value at all is refused."""
    finite = np.isfinite(frames)
    if finite.all():
        return frames
    if not finite.any():
        raise UnreadableImage(SkipReason.NOT_AN_IMAGE, "no finite pixel value")
    return np.where(finite, frames, frames[finite].min()).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Stage 2: frames -> the images the model sees


def apply_frame_policy(frames: np.ndarray, policy: str) -> np.ndarray:
    """(F, H, W) -> (K, H, W) under one of FRAME_POLICIES; K = F for "all", else 1."""
    picked = selected_frames(frames, policy)
    if policy == "volume":
        return frames
    if picked is None:
        return frames.max(axis=0, keepdims=True)
    return frames[picked]


def selected_frames(frames: np.ndarray, policy: str) -> list[int] | None:
    """The indices of the frames that become model images under `policy`, in order; None
    for "mip" and "volume", which combine every frame into one image. A mask follows its
    image through this choice (client/masks.py)."""
    _check_policy(policy)
    count = len(frames)
    if policy in ("mip", "volume"):
        return None
    if policy == "all":
        return list(range(count))
    if policy.startswith("every-"):
        return list(range(0, count, int(policy.removeprefix("every-"))))
    if policy == "middle":
        return [count // 2]
    contrast = frames.reshape(count, -1).std(axis=1)  # "peak"
    return [int(np.argmax(contrast))]


def spatial_dims_of(policy: str) -> int:
    """3 for the "volume" policy (the model sees (1, S, S, S) volumes), else 2."""
    return 3 if policy == "volume" else 2


def _check_policy(policy: str) -> None:
    """A wrong policy is a configuration error (ValueError), not an unreadable file."""
    if not frame_policy_ok(policy):
        raise ValueError(
            f"frame policy {policy!r} is not one of {', '.join(FRAME_POLICIES)}, every-K (K > 0)"
        )


# ---------------------------------------------------------------------------------------
# Stage 3: images -> model input


def to_model_input(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(K, H, W) -> (K, 1, S, S) float32: resize to S x S (the aspect ratio is not kept) and
    a z-score per image, so sites whose scanners differ in grey levels give the model
    comparable inputs. A constant image becomes zeros."""
    from monai.transforms import NormalizeIntensity  # here, not at the top: a tabular site never loads MONAI

    # MONAI treats the leading axis as channels: channel-wise normalisation gives each
    # image its own mean and std.
    out = np.asarray(NormalizeIntensity(channel_wise=True)(resize_frames(frames, image_size)), dtype=np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)[:, None]


def resize_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(K, H, W) -> (K, S, S) float32, the display intensities kept: the model input before
    its z-score (the radiomics features read these, fedir.client.radiomics)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    from monai.transforms import Resize  # here, not at the top: a tabular site never loads MONAI

    # K images share one resize call (MONAI's leading axis is channels)
    resize = Resize((image_size, image_size), mode=_resize_mode(frames.shape[1:], image_size))
    return np.asarray(resize(np.ascontiguousarray(frames, dtype=np.float32)), dtype=np.float32)


def to_volume_input(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(D, H, W) -> (1, 1, S, S, S) float32: the volume resized in 3D (trilinear or area, as
    `_resize_mode` picks) and z-scored as a whole, for a 3D network."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = (image_size,) * 3
    mode = "area" if min(frames.shape) >= image_size else "trilinear"
    from monai.transforms import Compose, NormalizeIntensity, Resize  # here, not at the top: a tabular site never loads MONAI

    transform = Compose([Resize(size, mode=mode), NormalizeIntensity()])
    out = np.asarray(transform(np.ascontiguousarray(frames, dtype=np.float32)[None]), dtype=np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)[None]


def _resize_mode(shape: tuple[int, ...], image_size: int) -> str:
    """Area averaging when shrinking (anti-aliased, no border artefacts, unlike MONAI's
    Gaussian anti-aliasing with zero padding); bilinear when enlarging (area would be
    nearest-neighbour there)."""
    return "area" if min(shape) >= image_size else "bilinear"


def load_image(path: Path, image_size: int, frame_policy: str = "mip") -> np.ndarray:
    """One file -> (K, 1, S, S) float32, or (1, 1, S, S, S) under the "volume" policy. Raises UnreadableImage for a bad file, ValueError
    for a bad policy or size (checked first, so a misconfiguration is not blamed on files)."""
    _check_policy(frame_policy)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    frames = apply_frame_policy(read_display_frames(path), frame_policy)
    if frame_policy == "volume":
        return to_volume_input(frames, image_size)
    return to_model_input(frames, image_size)
