"""Label maps of a synthetic image -> a DICOM Segmentation (highdicom) and PNG files.

Why a module of its own: `fedir data synth --masks` writes, for every image, the label map
of the frames it outlines in the two forms a site can hand fedir (client/masks.py reads
both): one DICOM SEG per image file, the form a PACS stores, and one 8-bit PNG per
outlined frame, the form any tool opens.

The SEG is BINARY with one segment per label (1 vessel, 2 stenosis; an empty segment's
frames are omitted) and references its source image: Study, Series and SOP Instance UIDs
and, per frame, the source frame (ReferencedFrameNumber, 1-based). Its pixel spacing is the
XA's ImagerPixelSpacing; an XA image has no Frame of Reference, so neither has the SEG.

highdicom builds a SEG for a multi-frame source only when the source has a patient
coordinate system (ImagePositionPatient or a Plane Position per frame), which a legacy XA
cine never has: it refuses ("Only a single frame is supported when the source image has no
Frame of Reference UID"). So each outlined frame's SEG is built against a single-frame view
of the cine's header (its own UIDs, NumberOfFrames 1, a Pixel Measures group), and the
frames are merged into one SEG whose per-frame references then name the cine's frame.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

SEGMENT_LABELS = {1: ("vessel", "59820001", "Blood vessel"), 2: ("stenosis", "415582006", "Stenosis")}
_CATEGORY = ("91723000", "SCT", "Anatomical structure")


def _descriptions() -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedir synthetic XA", version="1",
        family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"),
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=hd.sr.CodedConcept(*_CATEGORY),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (label, code, meaning) in SEGMENT_LABELS.items()
    ]


def _single_frame_view(source: Dataset) -> Dataset:
    """The source header as highdicom accepts it for one frame (see the module docstring)."""
    view = copy.deepcopy(source)
    view.NumberOfFrames = 1
    measures = Dataset()
    measures.PixelSpacing = source.get("PixelSpacing") or source.ImagerPixelSpacing
    measures.SliceThickness = None  # a projection has none; highdicom's reader wants the tag (type 2)
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    view.SharedFunctionalGroupsSequence = [group]
    return view


def write_seg(path: Path, source: Dataset, labels: np.ndarray, frames: list[int], uids: tuple[str, str],
              series_number: int) -> Path:
    """Write a BINARY SEG of `labels` ((K, H, W) uint8 label map, values 0..2) outlining the
    source's frames `frames` (0-based, K of them). `uids` = (series, SOP instance) UIDs, so
    that the same federation gets the same SEG; the content date is the source's."""
    if len(frames) != len(labels):
        raise ValueError(f"{len(labels)} label frames for {len(frames)} outlined frames")
    view = _single_frame_view(source)
    per_frame, pixels, segs = [], [], []
    for frame, label_map in zip(frames, labels):
        seg = hd.seg.Segmentation(
            source_images=[view], pixel_array=label_map[None],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(), series_instance_uid=uids[0],
            series_number=series_number, sop_instance_uid=uids[1], instance_number=1,
            manufacturer="fedir", manufacturer_model_name="synthetic XA federation",
            software_versions="1", device_serial_number="0",
        )
        stack = seg.pixel_array.reshape(int(seg.NumberOfFrames), *label_map.shape)
        for item in seg.PerFrameFunctionalGroupsSequence:
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber = frame + 1
            per_frame.append(item)
        pixels.append(stack)
        segs.append(seg)
    out = segs[0]
    merged = np.concatenate(pixels)
    out.PerFrameFunctionalGroupsSequence = per_frame
    out.NumberOfFrames = len(merged)
    out.PixelData = pack_bits(merged)
    out.SourceImageSequence[0].ReferencedFrameNumber = [f + 1 for f in frames] if len(frames) > 1 else frames[0] + 1
    organisation = generate_uid(entropy_srcs=[uids[1], "dimension organisation"])
    for item in (*out.DimensionIndexSequence, *out.DimensionOrganizationSequence):
        item.DimensionOrganizationUID = organisation
    for keyword in ("ContentDate", "SeriesDate", "InstanceCreationDate"):
        if keyword in out:
            setattr(out, keyword, source.get("ContentDate", source.get("StudyDate", "")))
    for keyword in ("ContentTime", "SeriesTime", "InstanceCreationTime"):
        if keyword in out:
            setattr(out, keyword, source.get("ContentTime", source.get("StudyTime", "")))
    for item in out.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{source.get('ContentDate', '')}{source.get('ContentTime', '')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, label_map: np.ndarray) -> Path:
    """One frame's label map (H, W), values 0..2, as an 8-bit greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label_map.astype(np.uint8), mode="L").save(path)
    return path
