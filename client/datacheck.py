"""`fedir data check SITE_DIR`: what a site's IT person needs to know before a study.

It validates the manifest, decodes every listed image once (with a progress bar, the same
reader the ClientApp uses, so what fails here fails in a round), and prints images
loaded, skipped by reason with the first paths of each, patients, labelled and unlabelled
patients, counts per split and per class, and the masks: runs and frames with a usable
mask, each skipped mask by reason with its row (client/masks.py), all-background frames. Local output is not suppressed: it never
leaves the site. `--card OUT.json` writes the k-suppressed data card (client/datacard.py),
the same one the ClientApp sends to the server in its first round.

Exit status: 0 when at least one image is usable, 1 when none is, 2 when the manifest is
invalid (fedir.cli prints the ManifestError).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fedir.client.datacard import DEFAULT_K, ImageOutcome, build_card
from fedir.client.imaging import UnreadableImage, read_display_frames
from fedir.client.manifest import read_manifest
from fedir.client.masks import MaskSummary, UnusableMask, read_mask
from fedir.models import NUM_CLASSES

FIRST_PATHS = 3


@dataclass
class SiteCheck:
    """The outcome of reading every image of a site once."""

    root: Path
    outcomes: list[ImageOutcome]
    details: dict[str, list[str]]  # skip reason -> "path: detail" of the first few files
    mask_problems: list[str]  # "row N, path: reason: detail" for every skipped mask
    seconds: float

    @property
    def loaded(self) -> int:
        return sum(o.skipped_reason is None for o in self.outcomes)


def check_site(site_dir: str | Path, *, progress: bool = True, num_classes: int = NUM_CLASSES) -> SiteCheck:
    """Validate the manifest (ManifestError if invalid: a label outside 0..num_classes-1,
    task.classes, among others) and try to read every image."""
    root = Path(site_dir).resolve()
    rows = read_manifest(root, num_classes)
    outcomes: list[ImageOutcome] = []
    details: dict[str, list[str]] = {}
    problems: list[str] = []
    start = time.perf_counter()
    for row in tqdm(rows, desc=f"checking {root.name}", unit="image", disable=not progress):
        try:
            frames = read_display_frames(row.path)
        except UnreadableImage as exc:
            outcomes.append(ImageOutcome.of(row, exc.reason.value))
            first = details.setdefault(exc.reason.value, [])
            if len(first) < FIRST_PATHS:
                first.append(f"{row.path.relative_to(root).as_posix()}: {exc.detail}")
            continue
        summary, reason = None, None
        if row.mask is not None:
            try:
                outlined = read_mask(row.mask, row.path, frames.shape, row.mask_frames)
                summary = MaskSummary(len(outlined), [float((m > 0).mean()) for m in outlined.values()])
            except UnusableMask as exc:
                reason = exc.reason.value
                problems.append(f"row {row.row}, {row.mask.relative_to(root).as_posix()}: {reason}: {exc.detail}")
        outcomes.append(ImageOutcome.of(row, None, summary, reason))
    return SiteCheck(root, outcomes, details, problems, time.perf_counter() - start)


def format_check(check: SiteCheck, val_fraction: float, test_fraction: float,
                 num_classes: int = NUM_CLASSES) -> str:
    """The printed report: the site's own, unsuppressed counts (k = 1)."""
    card = build_card(check.outcomes, val_fraction=val_fraction, test_fraction=test_fraction,
                      k=1, num_classes=num_classes)
    files, labels = card["files"], card["labels"]
    per_1000 = 1000 * check.seconds / max(len(check.outcomes), 1)
    lines = [
        f"site {check.root.name}: {files['listed']} images listed, {files['loaded']} loaded, "
        f"{files['listed'] - files['loaded']} skipped ({check.seconds:.1f} s, {per_1000:.1f} s per 1,000)",
    ]
    for reason, count in sorted(files["skipped"].items(), key=lambda item: -item[1]):
        lines.append(f"  skipped, {reason}: {count}")
        lines.extend(f"    {path}" for path in check.details[reason])
        if count > len(check.details[reason]):
            lines.append(f"    ... and {count - len(check.details[reason])} more")
    patients = card["patients"]
    lines.append(f"patients: {sum(patients.values())} "
                 f"({labels['labelled_patients']} labelled, {labels['unlabelled_patients']} unlabelled)")
    lines.append("per split (patients / images): " + ", ".join(
        f"{s} {patients[s]} / {card['images'][s]}" for s in patients))
    per_class = labels["per_class"]["values"]
    lines.append("labelled patients per class: "
                 + (", ".join(f"{c}: {n}" for c, n in per_class.items()) or "none"))
    masks = card["masks"]
    if masks["listed"]:
        lines.append(f"masks: {masks['listed']} listed, {masks['runs_with_masks']} files with a usable mask "
                     f"({masks['frames_with_masks']} outlined frames, {masks['patients_with_masks']} patients), "
                     f"{sum(masks['skipped'].values())} skipped, {masks['all_background_frames']} "
                     "all-background frame(s) (kept)")
        lines.extend(f"  mask skipped, {problem}" for problem in check.mask_problems)
    return "\n".join(lines)


def run_check(site_dir: Path, card_path: Path | None, *, k: int = DEFAULT_K,
              val_fraction: float = 0.15, test_fraction: float = 0.25, num_classes: int = NUM_CLASSES) -> int:
    """The command: print the report, write the card if asked; the exit status."""
    check = check_site(site_dir, num_classes=num_classes)
    print(format_check(check, val_fraction, test_fraction, num_classes))
    if card_path is not None:
        card = build_card(check.outcomes, val_fraction=val_fraction, test_fraction=test_fraction,
                          k=k, num_classes=num_classes)
        card_path.parent.mkdir(parents=True, exist_ok=True)
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        print(f"data card (cells below {k} suppressed): {card_path}")
    if check.loaded == 0:
        print("no usable image: this site cannot take part in a study")
        return 1
    return 0
