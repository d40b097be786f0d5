"""A site as the training loop sees it: tensors for train and test, imaging or tabular alike.

The ClientApp should not care whether its site holds images or a clinical table: this
module reads either (fedir.client.site for images, fedir.client.tabular for `clin_*` tables,
recognised from the manifest) into one `SiteView`, kept in memory for the life of the
process (and an imaging site's radiomics table, fedir.client.radiomics, read as a tabular
one). Tabular features are standardised here, at the site, with the statistics the
protocol asks for (`data.standardise`): the federation's, sent by the server from every
site's n / sum / sum of squares, or the site's own (FLamby's Fed-Heart-Disease protocol).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedir.client.datacard import foreground_counts
from fedir.client.manifest import Acquired, ManifestError, acquired_by_patient, manifest_columns, read_manifest
from fedir.client.radiomics import FEATURES, read_radiomics_site
from fedir.client.site import SiteData, load_site
from fedir.client.tabular import CLINICAL_PREFIX, is_tabular_site, read_tabular_site, standardise
from fedir.config import FUSED_INPUTS, Inputs, Settings, allowed
from fedir.models import NUM_CLASSES, fuse
from fedir.protocol import FeatureSums, ForegroundCounts, decode_round_config


@dataclass
class SiteView:
    """One site's training, validation and test data as tensors, and the aggregates it may share.

    The validation patients choose (the round whose model is kept, the decision
    threshold); the test patients only measure the choice.
    """

    name: str
    tabular: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_patients: list[str]
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_patients: list[str]
    label_counts: dict[int, int]  # labelled training patients per class
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    features: list[str] = field(default_factory=list)
    imaging: SiteData | None = None  # the decoded imaging site (its data card is built from it)
    # each patient's earliest `acquired` value (fedir.client.drift); never leaves the site
    acquired: dict[str, Acquired] = field(default_factory=dict)
    # a segmentation site's training patients per foreground-fraction bin (fedir.client.datacard)
    foreground: ForegroundCounts | None = None
    # training images whose target cannot mark them unlabelled in train_y (segmentation: the
    # frames without a usable mask, (N', 1, S, S)), for a semi-supervised objective; None
    # where train_y's own -1 does (classification) or nothing is unlabelled (survival)
    train_unlabelled: torch.Tensor | None = None
    # data.inputs = image+clinical: each row's last n_clinical columns are its patient's
    # clin_* values (fedir.models.FusionNet); clinical_train the training patients' rows
    n_clinical: int = 0
    clinical_train: np.ndarray | None = None

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(x, y, patients) of "val" or "test"."""
        if split not in ("val", "test"):
            raise ValueError(f"only the val and test splits are scored, not {split!r}")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), getattr(self, f"{split}_patients")

    @property
    def n_features(self) -> int:
        return len(self.features)

    def train_sums(self) -> FeatureSums | None:
        """n / sum / sum of squares of the training features: a tabular site's rows, or, fused,
        its training patients' clin_* values (one row per patient, as the tabular path); else None."""
        if self.clinical_train is not None:
            return FeatureSums.of(self.clinical_train)
        return FeatureSums.of(self.train_x.numpy()) if self.tabular else None


def load_view(site_dir: str, inputs: str, image_size: int, frame_policy: str, val: float,
              test: float, cache_dir: str | None = None, kind: str = "classification",
              num_classes: int = NUM_CLASSES) -> SiteView:
    """Read a site once per process (imaging sites also cache decoded images on disk).

    `inputs = "clinical"` reads only the clin_* columns of any site (the clinical-only
    baseline of an imaging site); "auto" reads the images, or the table of a tabular site;
    "image+clinical" an imaging site's images each followed by its patient's clin_* values
    (`_fused_view`; a second copy of the decoded images, in memory).
    `kind` (task.kind) says which target columns it reads (fedir.tasks); a survival site's
    `label_counts` are its training patients censored (0) and with the event (1), so the
    site-label association test is the event rate's association with the site.
    `num_classes` (task.classes): a classification label outside 0..num_classes-1 is refused.
    "radiomics" reads the images' handcrafted features (fedir.client.radiomics), one row per
    image, as a tabular site's rows.
    """
    if inputs not in allowed(Inputs):
        raise ValueError(f"data.inputs = {inputs!r}: choose one of {', '.join(allowed(Inputs))}")
    if inputs == "radiomics":
        return _radiomics_view(site_dir, image_size, frame_policy, val, test, cache_dir, num_classes)
    if inputs == FUSED_INPUTS:
        check_fused_site(site_dir, kind)
        return _fused_view(site_dir, image_size, frame_policy, val, test, cache_dir, num_classes)
    if inputs == "clinical" or is_tabular_site(site_dir):
        return _tabular_view(site_dir, val, test, kind, num_classes)
    if kind == "segmentation":
        return _segmentation_view(site_dir, image_size, frame_policy, val, test, cache_dir)
    if kind == "survival":
        return _survival_view(site_dir, image_size, frame_policy, val, test, cache_dir)
    return _imaging_view(site_dir, image_size, frame_policy, val, test, cache_dir, num_classes)


# A simulation worker serves many sites in turn (500 each for 1,000 sites on two cores):
# tables are small, so every site's stays in memory; decoded images are large, so only the
# last few sites' do (their decoded cache on disk makes a miss a file read, not a decode).
@cache
def _tabular_view(site_dir: str, val: float, test: float, kind: str = "classification",
                  num_classes: int = NUM_CLASSES) -> SiteView:
    site = read_tabular_site(site_dir, val_fraction=val, test_fraction=test, kind=kind, num_classes=num_classes)
    if site.train.y.ndim == 2:  # survival: censored (0) and event (1) patients
        counts = Counter(int(y) for y in site.train.y[:, 1])
    else:
        counts = Counter(int(y) for y in site.train.y if y >= 0)
    return SiteView(
        name=site.name,
        tabular=True,
        train_x=torch.from_numpy(site.train.x),
        train_y=torch.from_numpy(site.train.y),
        test_x=torch.from_numpy(site.test.x),
        test_y=torch.from_numpy(site.test.y),
        test_patients=site.test.patients,
        val_x=torch.from_numpy(site.val.x),
        val_y=torch.from_numpy(site.val.y),
        val_patients=site.val.patients,
        label_counts=dict(sorted(counts.items())),
        skipped=Counter({"missing clinical value": site.dropped_missing} if site.dropped_missing else {}),
        features=site.features,
        acquired=acquired_by_patient(site_dir),
    )


@lru_cache(maxsize=16)
def _imaging_view(site_dir: str, image_size: int, frame_policy: str, val: float, test: float,
                  cache_dir: str | None = None, num_classes: int = NUM_CLASSES) -> SiteView:
    site = load_site(site_dir, image_size=image_size, frame_policy=frame_policy,
                     val_fraction=val, test_fraction=test, cache_dir=None if cache_dir is None else Path(cache_dir),
                     num_classes=num_classes)
    return SiteView(
        name=site.name,
        tabular=False,
        train_x=site.train.images,
        train_y=site.train.labels,
        test_x=site.test.images,
        test_y=site.test.labels,
        test_patients=site.test.patients,
        val_x=site.val.images,
        val_y=site.val.labels,
        val_patients=site.val.patients,
        label_counts=site.patient_label_counts("train"),
        skipped=Counter(s.reason for s in site.skipped),
        imaging=site,
        acquired=acquired_by_patient(site_dir),
    )


@cache
def _radiomics_view(site_dir: str, image_size: int, frame_policy: str, val: float, test: float,
                    cache_dir: str | None = None, num_classes: int = NUM_CLASSES) -> SiteView:
    """An imaging site's feature table (fedir.client.radiomics), tabular to everything after
    it: its rows are images, and `label_counts` counts patients, as an imaging site's does."""
    if is_tabular_site(site_dir):
        raise ManifestError(f"{site_dir}: data.inputs = \"radiomics\" reads images, and this site's manifest "
                            "has no path column", "data.inputs = radiomics needs an imaging site (a path column)")
    site = read_radiomics_site(site_dir, image_size=image_size, frame_policy=frame_policy, val_fraction=val,
                               test_fraction=test, cache_dir=None if cache_dir is None else Path(cache_dir),
                               num_classes=num_classes)
    return SiteView(
        name=site.name, tabular=True,
        train_x=site.train.x, train_y=site.train.y,
        test_x=site.test.x, test_y=site.test.y, test_patients=site.test.patients,
        val_x=site.val.x, val_y=site.val.y, val_patients=site.val.patients,
        label_counts=site.patient_label_counts(), skipped=site.skipped, features=list(FEATURES),
        acquired=acquired_by_patient(site_dir),
    )


@lru_cache(maxsize=16)
def _segmentation_view(site_dir: str, image_size: int, frame_policy: str, val: float, test: float,
                       cache_dir: str | None = None) -> SiteView:
    """An imaging site for task.kind = segmentation: in every split, the images with a usable
    mask and their label maps, (N, 1, S, S) int64 targets (the patient split is the
    classification one: fedir.client.split). The training images without a usable mask are
    `train_unlabelled` (the semi-supervised objectives' frames; supervised DiceCE ignores
    them); no split scores an image without a mask.
    `label_counts` is empty: a segmentation site has no class per patient; `foreground`
    counts its training patients by foreground fraction instead."""
    view = _imaging_view(site_dir, image_size, frame_policy, val, test, cache_dir)
    assert view.imaging is not None
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    unlabelled = view.imaging.split("train").images
    for split in ("train", "val", "test"):
        part = view.imaging.split(split)
        if part.mask_of is None or part.masks is None or part.mask_count == 0:
            parts[split] = (part.images[:0], torch.zeros((0, 1, image_size, image_size), dtype=torch.int64), [])
            continue
        outlined = part.mask_of >= 0
        parts[split] = (part.images[outlined], part.masks[part.mask_of[outlined]].to(torch.int64),
                        [p for p, keep in zip(part.patients, outlined.tolist()) if keep])
        if split == "train":
            unlabelled = part.images[~outlined]
    return SiteView(
        name=view.name, tabular=False,
        train_x=parts["train"][0], train_y=parts["train"][1],
        test_x=parts["test"][0], test_y=parts["test"][1], test_patients=parts["test"][2],
        val_x=parts["val"][0], val_y=parts["val"][1], val_patients=parts["val"][2],
        label_counts={}, skipped=view.skipped, imaging=view.imaging, acquired=view.acquired,
        # unsuppressed (k = 1), as a classification site's label counts cross: suppressed cells
        # cost the bias test its power and, filled blindly, can name the wrong site
        foreground=foreground_counts(parts["train"][1].numpy(), parts["train"][2], k=1),
        train_unlabelled=unlabelled,
    )


@lru_cache(maxsize=16)
def _survival_view(site_dir: str, image_size: int, frame_policy: str, val: float, test: float,
                   cache_dir: str | None = None) -> SiteView:
    """An imaging site for task.kind = survival: every image of every split, each with its
    patient's (time, event) as an (N, 2) float32 target (fedir.tasks.survival; the manifest
    reader refuses a patient whose rows disagree on them). The decoded images are the
    classification view's (one cache). A patient's per-patient risk is the mean of its
    images' (fedir.tasks.survival.site_metrics). `label_counts`: the training patients
    censored (0) and with the event (1), as a tabular survival site's."""
    outcome = {row.patient_id: row.outcome for row in read_manifest(site_dir, kind="survival")
               if row.outcome is not None}
    view = _imaging_view(site_dir, image_size, frame_policy, val, test, cache_dir)
    assert view.imaging is not None
    targets = {split: torch.tensor([outcome[p] for p in view.imaging.split(split).patients],
                                   dtype=torch.float32).reshape(-1, 2) for split in ("train", "val", "test")}
    train_events = {p: int(outcome[p][1]) for p in view.imaging.train.patients}
    return SiteView(
        name=view.name, tabular=False,
        train_x=view.train_x, train_y=targets["train"],
        test_x=view.test_x, test_y=targets["test"], test_patients=view.test_patients,
        val_x=view.val_x, val_y=targets["val"], val_patients=view.val_patients,
        label_counts=dict(sorted(Counter(train_events.values()).items())), skipped=view.skipped,
        imaging=view.imaging, acquired=view.acquired,
    )


@lru_cache(maxsize=16)
def _fused_view(site_dir: str, image_size: int, frame_policy: str, val: float, test: float,
                cache_dir: str | None = None, num_classes: int = NUM_CLASSES) -> SiteView:
    """An imaging site for `data.inputs = "image+clinical"`: every image's pixels followed by
    its patient's clin_* values (fedir.models.fuse), unscaled (scale_rows standardises the
    clinical columns as the protocol says). The patient split is the images' (the clinical
    table is split by the same hash, fedir.client.tabular); images of a patient with a
    missing covariate are left out and counted."""
    images = _imaging_view(site_dir, image_size, frame_policy, val, test, cache_dir, num_classes)
    assert images.imaging is not None
    table = read_tabular_site(site_dir, val_fraction=val, test_fraction=test, num_classes=num_classes)
    rows = {p: x for split in ("train", "val", "test") for p, x in zip(table.split(split).patients, table.split(split).x)}
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    left_out = 0
    for split in ("train", "val", "test"):
        part = images.imaging.split(split)
        keep = [p in rows for p in part.patients]
        left_out += keep.count(False)
        kept = [p for p, k in zip(part.patients, keep) if k]
        clinical = torch.from_numpy(np.asarray([rows[p] for p in kept], dtype=np.float32).reshape(-1, len(table.features)))
        index = torch.tensor(keep, dtype=torch.bool)
        parts[split] = (fuse(part.images[index], clinical), part.labels[index], kept)
    skipped = Counter(images.skipped)
    if left_out:
        skipped["image of a patient with a missing clinical value"] += left_out
    return SiteView(
        name=images.name, tabular=False,
        train_x=parts["train"][0], train_y=parts["train"][1],
        test_x=parts["test"][0], test_y=parts["test"][1], test_patients=parts["test"][2],
        val_x=parts["val"][0], val_y=parts["val"][1], val_patients=parts["val"][2],
        label_counts=images.label_counts, skipped=skipped, features=table.features, imaging=images.imaging,
        acquired=images.acquired, n_clinical=len(table.features), clinical_train=table.train.x,
    )


def check_fused_site(site_dir: str, kind: str = "classification") -> None:
    """`data.inputs = "image+clinical"` needs images and clin_* columns at every site: ManifestError otherwise."""
    columns = manifest_columns(site_dir)
    if is_tabular_site(site_dir) or "path" not in columns:
        raise ManifestError(f"{site_dir}: data.inputs = {FUSED_INPUTS} needs images, and this manifest has no path column",
                            f"data.inputs = {FUSED_INPUTS} needs images, and this site's manifest has no path column")
    if not any(c.startswith(CLINICAL_PREFIX) for c in columns):
        raise ManifestError(f"{site_dir}: data.inputs = {FUSED_INPUTS} needs clin_* columns, and this manifest has none",
                            f"data.inputs = {FUSED_INPUTS} needs clin_* columns, and this site's manifest has none")
    if kind != "classification":
        raise ManifestError(f"{site_dir}: data.inputs = {FUSED_INPUTS} classifies; task.kind = {kind!r}",
                            f"data.inputs = {FUSED_INPUTS} classifies; task.kind = {kind!r}")


def check_manifest(site_dir: str, inputs: str, kind: str = "classification", num_classes: int = NUM_CLASSES) -> None:
    """Read the site's manifest as `load_view` would, without decoding an image: the
    ManifestError the site would raise on its first message (a simulation checks every
    site so before starting Flower)."""
    if inputs == FUSED_INPUTS:
        check_fused_site(site_dir, kind)
        read_manifest(site_dir, num_classes, kind)
        read_tabular_site(site_dir, kind=kind, num_classes=num_classes)
        return
    if inputs != "radiomics" and (inputs == "clinical" or is_tabular_site(site_dir)):
        read_tabular_site(site_dir, kind=kind, num_classes=num_classes)
        acquired_by_patient(site_dir)
    else:
        read_manifest(site_dir, num_classes, kind)


def masked_rows(site_dir: str) -> int:
    """Rows of an imaging site's manifest that name a mask (the labelled set of a
    segmentation site; whether each mask is usable is known only once it is read)."""
    if is_tabular_site(site_dir):
        return 0
    return sum(row.mask is not None for row in read_manifest(site_dir, NUM_CLASSES, "segmentation"))


def view_of(site_dir: str, settings: Settings, cache_dir: str | None = None) -> SiteView:
    return load_view(site_dir, settings.data_inputs, settings.model_image_size,
                     settings.data_frame_policy,
                     settings.data_val_fraction, settings.data_test_fraction, cache_dir, settings.task_kind,
                     settings.task_classes)


def scaler(
    settings: Settings, config: ConfigRecord, own: FeatureSums
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for this protocol: the federation's from the server's config, or the
    statistics `own` of the rows at hand (`data.standardise = "site"`), or none at all
    (`"none"`: mean 0, std 1)."""
    if settings.data_standardise == "none":
        return np.zeros_like(own.total), np.ones_like(own.total)
    if settings.data_standardise == "site":
        return own.mean_std()
    sent = decode_round_config(config)
    if sent.mean is None or sent.std is None:
        raise ValueError("data.standardise = federated, but the server sent no feature statistics")
    return sent.mean, sent.std


def scaled(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(standardise(x.numpy(), mean, std))


def scale_rows(settings: Settings, config: ConfigRecord, site: SiteView, x: torch.Tensor,
               own: FeatureSums | None = None) -> torch.Tensor:
    """`x` with its clinical columns standardised as the protocol says (`scaler`): every
    column of a tabular site's rows, the last `n_clinical` of fused rows (with the site's
    per-patient training sums as its own statistics), an image's pixels never. `own`: the
    statistics `data.standardise = "site"` uses (default: the site's training rows')."""
    if not len(x) or not (site.tabular or site.n_clinical):
        return x
    stats = own or site.train_sums()
    assert stats is not None
    if site.tabular:
        return scaled(x, *scaler(settings, config, stats))
    pixels = x.shape[1] - site.n_clinical
    return torch.cat([x[:, :pixels], scaled(x[:, pixels:].contiguous(), *scaler(settings, config, stats))], dim=1)
