"""One mask file -> label images aligned with its image's model inputs, or a MaskSkipReason.

A manifest row may name a `mask`: a label image of the row's image (0 = background,
1 = vessel, 2 = stenosis; MASK_LABELS). Formats, chosen by suffix:

- DICOM SEG (`.dcm`, or any file with the DICM marker), read with highdicom: it must refer
  to the row's image (the image's Study, Series and SOP Instance UIDs, and its Frame of
  Reference where both have one) and hold segments 1 and/or 2 only; the frames it outlines
  are the source frames its per-frame references name (ReferencedFrameNumber). A SEG can
  refer only to a DICOM file, not to a series folder.
- PNG (one frame, 8- or 16-bit greyscale), NIfTI (`.nii`, `.nii.gz`, read with nibabel;
  the array as (rows, columns) or (rows, columns, frames), the layout nibabel writes from a
  NumPy image) and NumPy `.npy` ((H, W) or (F, H, W)).

Which frames the mask outlines: `mask_frames` in the manifest (0-based, in the mask's frame
order); without it the mask must have one frame per image frame. A SEG states its frames
itself; `mask_frames`, if given, must agree. Frames not outlined are unlabelled.

The mask then follows the image's frame policy (fedir.client.imaging.selected_frames):
under "all", "every-K", "middle" and "peak" each selected frame gets its own mask, or none
when that frame is not outlined; "mip" and "volume" combine every frame, so the image has a
mask only when every frame is outlined (the mip's mask is the per-pixel maximum of the
frames' labels: a stenosis in any frame stays a stenosis). Resizing is nearest-neighbour
(MONAI `Resize`, mode "nearest-exact": the pixel nearest each output pixel's centre, which
stays aligned with the image's area-averaged resize, where plain "nearest" shifts by up to
one input pixel).

A mask that cannot be used raises UnusableMask with its reason; the site keeps the image,
unlabelled, and counts the skipped mask (client/site.py). A mask that is all background is
used (a frame without a vessel or lesion is a real answer, and dropping it would bias the
foreground fraction upwards) and counted, so a site can see an export that lost its
labels.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from fedir.client.imaging import (
    _has_dicom_magic,
    selected_frames,
    to_model_input,
    to_volume_input,
)

MASK_LABELS = (0, 1, 2)  # background, vessel, stenosis
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PNG_MODES = frozenset({"1", "L", "I", "I;16"})


class MaskSkipReason(str, enum.Enum):
    """Why a mask was not used; the values are what the data card and the skip counts show
    (no path, no value: they may leave the site)."""

    MISSING = "mask: missing file"
    UNREADABLE = "mask: unreadable"
    SIZE = "mask: size differs from its image"
    FRAMES = "mask: frames do not match its image"
    OTHER_IMAGE = "mask: refers to another image"
    LABELS = "mask: labels outside 0, 1, 2"


class UnusableMask(Exception):
    """A mask that cannot label its image; `reason` a MaskSkipReason, `detail` free text."""

    def __init__(self, reason: MaskSkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class MaskSummary:
    """What the data card needs of one row's mask: the outlined frames that were read and
    each one's foreground fraction (share of non-zero pixels, at the mask's resolution)."""

    frames: int = 0
    foreground: list[float] = field(default_factory=list)

    @property
    def all_background(self) -> int:
        """Outlined frames without a single foreground pixel."""
        return sum(f == 0.0 for f in self.foreground)


# ---------------------------------------------------------------------------------------
# Reading: file -> {image frame index: (H, W) uint8 labels}


def read_mask(mask: Path, image: Path, image_shape: tuple[int, int, int],
              mask_frames: tuple[int, ...] | None) -> dict[int, np.ndarray]:
    """The frames a mask outlines, checked against its image of shape (F, H, W).

    Returns {image frame index: (H, W) uint8 label map}. Raises UnusableMask, and nothing
    else, for a mask that is missing, unreadable, of another size or frame count than its
    image, refers to another image (SEG), or holds labels outside MASK_LABELS.
    """
    if not mask.is_file():
        raise UnusableMask(MaskSkipReason.MISSING, str(mask))
    count = image_shape[0]
    name = mask.name.lower()
    if name.endswith(".png"):
        outlined = _by_frames(_read_png(mask)[None], mask_frames, count)
    elif name.endswith(_NIFTI_SUFFIXES):
        outlined = _by_frames(_read_nifti(mask), mask_frames, count)
    elif name.endswith(".npy"):
        outlined = _by_frames(_read_npy(mask), mask_frames, count)
    elif name.endswith((".dcm", ".dicom")) or _has_dicom_magic(mask):
        outlined = _read_seg(mask, image, count, mask_frames)
    else:
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"unsupported mask format {mask.suffix!r}")
    for frame in outlined.values():
        if frame.shape != tuple(image_shape[1:]):
            raise UnusableMask(MaskSkipReason.SIZE, f"mask {frame.shape[0]}x{frame.shape[1]}, "
                                                    f"image {image_shape[1]}x{image_shape[2]}")
    return {index: _labels(frame) for index, frame in outlined.items()}


def _by_frames(stack: np.ndarray, mask_frames: tuple[int, ...] | None, count: int) -> dict[int, np.ndarray]:
    """A (K, H, W) mask -> image frames: `mask_frames` in order, or one per image frame."""
    if mask_frames is None:
        if len(stack) != count:
            raise UnusableMask(MaskSkipReason.FRAMES, f"{len(stack)} mask frame(s) for {count} image frame(s) "
                                                      "and no mask_frames")
        return dict(enumerate(stack))
    if len(mask_frames) != len(stack):
        raise UnusableMask(MaskSkipReason.FRAMES, f"{len(stack)} mask frame(s), mask_frames names {len(mask_frames)}")
    if max(mask_frames) >= count:
        raise UnusableMask(MaskSkipReason.FRAMES, f"mask_frames names frame {max(mask_frames)} of a "
                                                  f"{count}-frame image (0-based)")
    return dict(zip(mask_frames, stack))


def _labels(frame: np.ndarray) -> np.ndarray:
    """An outlined frame as uint8 labels; a value that is not one of MASK_LABELS refuses it."""
    if frame.dtype.kind == "f" and not np.all(np.isfinite(frame) & (frame == np.round(frame))):
        raise UnusableMask(MaskSkipReason.LABELS, "non-integer values")
    values = np.unique(frame)
    outside = [v for v in values.tolist() if v not in MASK_LABELS]
    if outside:
        shown = ", ".join(f"{v:g}" for v in outside[:5])
        raise UnusableMask(MaskSkipReason.LABELS, f"values {shown}")
    return frame.astype(np.uint8)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in _PNG_MODES:
                raise UnusableMask(MaskSkipReason.UNREADABLE, f"PNG mode {img.mode}: not a greyscale label image")
            return np.asarray(img).astype(np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"Pillow: {exc}") from None


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib  # here: a classification site without masks never loads it

    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a corrupt file
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"nibabel: {type(exc).__name__}: {exc}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        return data[None]
    if data.ndim == 3:
        return np.moveaxis(data, -1, 0)
    raise UnusableMask(MaskSkipReason.UNREADABLE, f"NIfTI array of shape {data.shape}")


def _read_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"NumPy: {exc}") from None
    if data.dtype.kind not in "biuf" or data.ndim not in (2, 3):
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"array of dtype {data.dtype}, shape {data.shape}")
    return data[None] if data.ndim == 2 else data


def _read_seg(path: Path, image: Path, count: int, mask_frames: tuple[int, ...] | None) -> dict[int, np.ndarray]:
    """A DICOM SEG -> the frames of `image` it outlines, as label maps (segment number = label)."""
    import highdicom as hd  # here: a site without SEG masks never loads it

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom and highdicom raise many types
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"not a readable DICOM SEG: {type(exc).__name__}: {exc}") from None
    if str(seg.SOPClassUID) not in SEG_SOP_CLASSES:
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"SOP class {seg.SOPClassUID} is not a Segmentation")
    source = _image_header(image)
    uids = tuple(str(source.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    refs = [tuple(str(u) for u in ref) for ref in seg.get_source_image_uids()]
    if refs != [uids]:
        raise UnusableMask(MaskSkipReason.OTHER_IMAGE, f"the SEG refers to {len(refs)} image(s), not to this one")
    if "FrameOfReferenceUID" in seg and "FrameOfReferenceUID" in source and \
            seg.FrameOfReferenceUID != source.FrameOfReferenceUID:
        raise UnusableMask(MaskSkipReason.OTHER_IMAGE, "another Frame of Reference")
    segments = sorted(int(item.SegmentNumber) for item in seg.SegmentSequence)
    if any(number not in MASK_LABELS[1:] for number in segments):
        raise UnusableMask(MaskSkipReason.LABELS, f"segment numbers {segments}")
    numbers = sorted({int(item.DerivationImageSequence[0].SourceImageSequence[0].get("ReferencedFrameNumber", 1))
                      for item in seg.PerFrameFunctionalGroupsSequence})
    if numbers and (numbers[0] < 1 or numbers[-1] > count):
        raise UnusableMask(MaskSkipReason.FRAMES, f"the SEG outlines frame {numbers[-1]} of a {count}-frame image")
    frames = tuple(n - 1 for n in numbers)
    if mask_frames is not None and tuple(sorted(mask_frames)) != frames:
        raise UnusableMask(MaskSkipReason.FRAMES, f"mask_frames {list(mask_frames)}, the SEG outlines {list(frames)}")
    if (int(seg.Rows), int(seg.Columns)) != (int(source.Rows), int(source.Columns)):
        raise UnusableMask(MaskSkipReason.SIZE, f"mask {seg.Rows}x{seg.Columns}, image {source.Rows}x{source.Columns}")
    if not numbers:
        return {}
    try:
        pixels = seg.get_pixels_by_source_frame(uids[2], numbers, combine_segments=True)
    except Exception as exc:  # noqa: BLE001 - overlapping segments, bad frames: highdicom raises many types
        raise UnusableMask(MaskSkipReason.UNREADABLE, f"highdicom: {type(exc).__name__}: {exc}") from None
    return dict(zip(frames, np.asarray(pixels)))


def _image_header(image: Path) -> pydicom.Dataset:
    """The image's UIDs and size, for a SEG to be checked against; a non-DICOM image (or a
    series folder) cannot be the source a SEG refers to."""
    try:
        return pydicom.dcmread(image, stop_before_pixels=True,
                               specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                              "FrameOfReferenceUID", "Rows", "Columns"])
    except Exception as exc:  # noqa: BLE001 - not DICOM, a folder, a corrupt header
        raise UnusableMask(MaskSkipReason.OTHER_IMAGE, f"a SEG needs a DICOM image file ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------------------
# Frame policy and resize: outlined frames -> one mask per model image


def masks_for_policy(outlined: dict[int, np.ndarray], frames: np.ndarray, policy: str) -> list[np.ndarray | None]:
    """One entry per model image of the file under `policy` (as
    fedir.client.imaging.apply_frame_policy makes them): its (H, W) labels, or, for
    "volume", its (F, H, W) labels; None where the image is not outlined."""
    picked = selected_frames(frames, policy)
    if picked is not None:
        return [outlined.get(index) for index in picked]
    if len(outlined) < len(frames):
        return [None]
    stack = np.stack([outlined[index] for index in range(len(frames))])
    return [stack if policy == "volume" else stack.max(axis=0)]


def to_mask_input(labels: np.ndarray, image_size: int, volume: bool = False) -> np.ndarray:
    """(K, H, W) labels -> (K, 1, S, S) uint8, or (D, H, W) -> (1, 1, S, S, S) for a volume:
    the image's resize (to_model_input / to_volume_input) with nearest-neighbour labels."""
    from monai.transforms import Resize  # here, not at the top: a tabular site never loads MONAI

    if volume:
        out = Resize((image_size,) * 3, mode="nearest-exact")(labels[None].astype(np.float32))
        return np.asarray(out).astype(np.uint8)[None]
    out = Resize((image_size, image_size), mode="nearest-exact")(labels.astype(np.float32))
    return np.asarray(out).astype(np.uint8)[:, None]


@dataclass
class LabelledImage:
    """A file's model images with the masks of those that are outlined."""

    images: np.ndarray  # (K, 1, S, S) float32, or (1, 1, S, S, S) under "volume"
    masks: list[np.ndarray | None]  # per image: (1, S, S) / (1, S, S, S) uint8, or None
    summary: MaskSummary | None  # None when the mask was not usable
    problem: UnusableMask | None = None


def load_labelled_image(path: Path, mask: Path, mask_frames: tuple[int, ...] | None, image_size: int,
                        frame_policy: str) -> LabelledImage:
    """An image and its mask -> model images and aligned masks. Raises UnreadableImage for
    the image (as load_image); a mask problem is returned, not raised, with the image kept."""
    from fedir.client.imaging import apply_frame_policy, read_display_frames

    frames = read_display_frames(path)
    chosen = apply_frame_policy(frames, frame_policy)
    volume = frame_policy == "volume"
    images = to_volume_input(chosen, image_size) if volume else to_model_input(chosen, image_size)
    try:
        outlined = read_mask(mask, path, frames.shape, mask_frames)
    except UnusableMask as exc:
        return LabelledImage(images, [None] * len(images), None, exc)
    summary = MaskSummary(len(outlined), [float(np.count_nonzero(m)) / m.size for m in outlined.values()])
    masks = [None if m is None else to_mask_input(m if volume else m[None], image_size, volume)[0]
             for m in masks_for_policy(outlined, frames, frame_policy)]
    return LabelledImage(images, masks, summary)
