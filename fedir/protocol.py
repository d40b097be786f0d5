"""What crosses the trust boundary, defined once: every record between a site and the coordinator,
in both directions (what the server sends each round, what a site replies, and the one codec
of a model's weights); the ClientApp and the ServerApp build and read messages only here.

Flower 1.41 aborts a round when one site's MetricRecord has a key another lacks, and
MetricRecord values can only be numbers or lists of numbers. So every site sends the same
keys: a metric that cannot be computed is sent as -1 with its `-ok` flag at 0, and the
human reason travels in a ConfigRecord beside it (as JSON text, so that sites with
different reasons still send the same keys). Besides the model's weights, everything a
site sends is an aggregate: counts, losses, metrics and fixed-bin histograms; never an
image, an identifier or a per-patient value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.compat.common import recorddict_compat as legacy

from fedir.config import UpdateDtype, allowed
from fedir.metrics import COUNTS, HISTOGRAMS, SCALAR_METRICS, SCORE_SUMS
from fedir.tasks.multiclass_metrics import (
    CLASS_AUCS,
    CONFUSION,
    HIST_CLASS,
    HIST_REST,
    MULTICLASS_COUNTS,
    MULTICLASS_SCALARS,
    SENSITIVITY,
)
from fedir.tasks.segmentation_metrics import (
    FOREGROUND_BIN_NAMES,
    FOREGROUND_NAMES,
    SEG_COUNTS,
    SEG_FLOAT_VECTORS,
    SEG_INT_VECTORS,
    SEG_SCALARS,
)
from fedir.tasks.survival_metrics import (
    SURVIVAL_COUNTS,
    SURVIVAL_FLOAT_VECTORS,
    SURVIVAL_INT_VECTORS,
    SURVIVAL_SCALARS,
)

METRICS_KEY = "metrics"
SITE_KEY = "site"
ARRAYS_KEY = "arrays"  # the model's weights (Flower's strategies' `arrayrecord_key`)
CONFIG_KEY = "config"  # the round's settings (Flower's strategies' `configrecord_key`)
WEIGHT_KEY = "num-examples"
CARD_KEY = "data-card"
DRIFT_KEY = "drift"  # a site's test metrics per acquisition period (fedir.client.drift), as JSON
# a fused model's per-input AUC drops at the site (fedir.client.input_sensitivity), as JSON
# (not "sensitivity": a site's metrics already name one so)
SENSITIVITY_KEY = "input_sensitivity"
# a pretraining study's evaluation (fedir.client.pretraining): per split, as JSON in the ConfigRecord
PRETRAINING_KEY = "pretraining"
PRETRAINING_COUNTS = ("n_images",)
PRETRAINING_SCALARS = ("contrastive_loss", "contrastive_chance", "view_match")
PRETRAINING_SPLITS = ("test", "val")
EMBEDDING_KEY = "embedding"

MISSING = -1.0


STATS_KEY = "feature-sums"
NAMES_KEY = "feature-names"
MEAN_KEY = "feature-mean"  # the federation's standardisation, in each train/evaluate config
STD_KEY = "feature-std"
ROUND_KEY = "server-round"  # set by Flower's strategies in every train/evaluate config
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx in its train config
LEGACY_PROXIMAL_MU_KEY = "proximal_mu"  # set by Flower's legacy FedProx (secure aggregation)
RUN_ID_KEY = "run-id"  # the study's run id, in each train/evaluate config: a site's saved state is keyed by it
UPDATE_DTYPES = allowed(UpdateDtype)  # train.update-dtype: the precision of a site's upload


@dataclass(frozen=True)
class EmbeddingMoments:
    """Count, mean and covariance of the features per class and overall (the last row)."""

    counts: np.ndarray  # (C + 1,) int
    means: np.ndarray  # (C + 1, d)
    covs: np.ndarray  # (C + 1, d, d)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])



SUPPRESSED = -1  # a count cell below k, withheld by the site (fedir.client.datacard.suppress's rule)


@dataclass(frozen=True)
class ForegroundCounts:
    """A segmentation site's training patients per foreground-fraction bin, for each
    foreground class: the input of the foreground-by-site test
    (fedir.strategies.segmentation_bias), as a classification site's label counts are of
    the site-label association.

    `counts[c][b]`: the patients whose mean fraction of class FOREGROUND_NAMES[c]'s pixels
    over their masked training images falls in bin FOREGROUND_BIN_NAMES[b] (each patient in
    one bin per class), or SUPPRESSED for a cell below `k` (and, when a row has exactly one
    such cell, its next smallest too: the data card's rule). `patients` is every row's
    total, not suppressed (like the data card's patient counts): the server knows how many
    patients a row's suppressed cells hold together, never how they divide. Counts only:
    no fraction, no patient.
    """

    patients: int
    k: int
    counts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        shape = (len(FOREGROUND_NAMES), len(FOREGROUND_BIN_NAMES))
        if len(self.counts) != shape[0] or any(len(row) != shape[1] for row in self.counts):
            raise ValueError(f"foreground counts: expected {shape[0]} rows of {shape[1]} bins")
        if self.patients < 0 or self.k < 1:
            raise ValueError("foreground counts: patients must be >= 0 and k >= 1")
        for row in self.counts:
            shown = [c for c in row if c != SUPPRESSED]
            if any(c < 0 for c in shown) or any(0 < c < self.k for c in shown) or sum(shown) > self.patients:
                raise ValueError("foreground counts: a cell is negative, below k unsuppressed, or the shown "
                                 "cells exceed the patients")
            if sum(shown) < self.patients and SUPPRESSED not in row:
                raise ValueError("foreground counts: a row's cells do not add up to its patients")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form the server keeps (the run's checkpoint, the bias tests' input)."""
        return {"patients": self.patients, "k": self.k, "counts": [list(row) for row in self.counts]}


@dataclass(frozen=True)
class FeatureSums:
    """n, sum and sum of squares per feature: all that standardisation needs, no rows."""

    n: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> FeatureSums:
        x64 = x.astype(np.float64)
        return cls(int(x.shape[0]), x64.sum(axis=0), (x64**2).sum(axis=0))

    def __add__(self, other: FeatureSums) -> FeatureSums:
        return FeatureSums(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population standard deviation; a constant feature gets std 1 (left as is)."""
        if self.n == 0:
            raise ValueError("no rows to standardise with")
        mean = self.total / self.n
        var = np.maximum(self.total_sq / self.n - mean**2, 0.0)
        std = np.sqrt(var)
        return mean, np.where(std > 1e-12, std, 1.0)


def combine(sums: list[FeatureSums]) -> FeatureSums:
    """The federation's sums: the element-wise total over sites."""
    out = sums[0]
    for s in sums[1:]:
        out = out + s
    return out



# ---- what the server sends each round ---------------------------------------------------


@dataclass(frozen=True)
class RoundConfig:
    """A train or evaluate message's settings, as a site reads them.

    `mean`/`std` are the federation's feature standardisation (tabular studies; None for
    imaging); the round number and FedProx's mu are added by Flower's strategies.
    """

    server_round: int = 0
    proximal_mu: float = 0.0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    run_id: str | None = None  # fedir's run id (server.checkpoint adds it), keying a site's saved state


def encode_round_config(
    standardisation: tuple[np.ndarray, np.ndarray] | None, server_round: int | None = None
) -> ConfigRecord:
    """The ConfigRecord the server hands Flower's strategy for every train and evaluate
    message (the strategy adds the round number itself); `server_round` is set here only
    for messages the server sends outside the strategy (the cross-site evaluation)."""
    config = ConfigRecord()
    if standardisation is not None:
        mean, std = standardisation
        config[MEAN_KEY] = [float(v) for v in mean]
        config[STD_KEY] = [float(v) for v in std]
    if server_round is not None:
        config[ROUND_KEY] = int(server_round)
    return config


def decode_round_config(config: ConfigRecord) -> RoundConfig:
    """The inverse of encode_round_config, with what Flower's strategies added."""
    has_stats = MEAN_KEY in config
    return RoundConfig(
        server_round=int(_number(config.get(ROUND_KEY, 0), ROUND_KEY)),
        proximal_mu=_number(config.get(PROXIMAL_MU_KEY, config.get(LEGACY_PROXIMAL_MU_KEY, 0.0)), PROXIMAL_MU_KEY),
        mean=np.asarray(config[MEAN_KEY], dtype=np.float64) if has_stats else None,
        std=np.asarray(config[STD_KEY], dtype=np.float64) if has_stats else None,
        run_id=str(config[RUN_ID_KEY]) if RUN_ID_KEY in config else None,
    )


def decode_instruction(content: RecordDict) -> tuple[ArrayRecord, ConfigRecord]:
    """A train or evaluate message from the server's strategy: the global model and the
    round's config (read with decode_round_config)."""
    return content.array_records[ARRAYS_KEY], content.config_records[CONFIG_KEY]


def site_name(content: RecordDict) -> str | None:
    """The site name a reply carries, or None when it carries none."""
    site_rec = content.config_records.get(SITE_KEY)
    return str(site_rec["name"]) if site_rec is not None and "name" in site_rec else None



def _number(value: object, key: str) -> float:
    """A record's scalar value as a float; a list or text where a number belongs is a
    malformed message, refused naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"record key {key!r}: expected a number, got {type(value).__name__}")
    return float(value)


def _numbers(value: object, key: str) -> list[float]:
    """A record's list value as floats (refused, naming the key, when it is no list of numbers)."""
    if not isinstance(value, list):
        raise ValueError(f"record key {key!r}: expected a list of numbers, got {type(value).__name__}")
    return [_number(v, key) for v in value]

def _key(name: str) -> str:
    return name.replace("_", "-")


# The metric sets of an evaluation reply, by key prefix: the test patients per image and per
# patient (fedir.metrics.site_metrics's `per_patient`), and the same for the validation
# patients, from which the server selects the round and the decision threshold.
VAL_KEY = "val"
TASK_KEY = "task-kind"  # the task kind of an evaluation reply (fedir.tasks)
SURVIVAL = "survival"
SEGMENTATION = "segmentation"
# The kinds whose evaluation is one flat set (no per-image / per-patient pair): its counts,
# scalars with CIs, integer and float vectors (fedir.tasks.survival_metrics, segmentation_metrics)
_FLAT_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    SURVIVAL: (SURVIVAL_COUNTS, SURVIVAL_SCALARS, SURVIVAL_INT_VECTORS, SURVIVAL_FLOAT_VECTORS),
    SEGMENTATION: (SEG_COUNTS, SEG_SCALARS, SEG_INT_VECTORS, SEG_FLOAT_VECTORS),
}
MULTICLASS = "multiclass"  # the wire kind of a classification reply with task.classes > 2
_PATIENT_PREFIX = "patient-"
_VAL_PREFIX = "val-"


def _put_metric_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, metrics: Mapping[str, Any]) -> None:
    """One site_metrics dict (without its nested sets) into the reply under `prefix`."""
    for name in COUNTS:
        rec[prefix + _key(name)] = int(metrics[name])
    for name in SCALAR_METRICS:
        value, ci = metrics.get(name), metrics.get(f"{name}_ci")
        key = prefix + _key(name)
        rec[key] = MISSING if value is None else float(value)
        rec[f"{key}-ok"] = 0 if value is None else 1
        rec[f"{key}-ci"] = [MISSING, MISSING] if ci is None else [float(ci[0]), float(ci[1])]
        rec[f"{key}-ci-ok"] = 0 if ci is None else 1
    for name in HISTOGRAMS:
        rec[prefix + _key(name)] = [int(v) for v in metrics[name]]
    # calibration: the scores' sum per bin (floats) and the expected calibration error
    rec[prefix + _key(SCORE_SUMS)] = [float(v) for v in metrics[SCORE_SUMS]]
    ece = metrics.get("ece")
    rec[prefix + "ece"] = MISSING if ece is None else float(ece)
    rec[prefix + "ece-ok"] = 0 if ece is None else 1
    site_rec[prefix + "reasons"] = json.dumps(metrics.get("reasons", {}))


def _get_metric_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str) -> dict[str, Any]:
    """The inverse of _put_metric_set."""
    out: dict[str, Any] = {name: int(_number(rec[prefix + _key(name)], name)) for name in COUNTS}
    for name in SCALAR_METRICS:
        key = prefix + _key(name)
        out[name] = _number(rec[key], name) if rec[f"{key}-ok"] else None
        ci = _numbers(rec[f"{key}-ci"], f"{name}-ci")
        out[f"{name}_ci"] = [ci[0], ci[1]] if rec[f"{key}-ci-ok"] else None
    for name in HISTOGRAMS:
        out[name] = [int(v) for v in _numbers(rec[prefix + _key(name)], name)]
    out[SCORE_SUMS] = _numbers(rec[prefix + _key(SCORE_SUMS)], SCORE_SUMS)
    out["ece"] = _number(rec[prefix + "ece"], "ece") if rec[prefix + "ece-ok"] else None
    out["reasons"] = json.loads(str(site_rec[prefix + "reasons"]))
    return out


def _put_scalar(rec: MetricRecord, key: str, value: float | None, ci: Any) -> None:
    """A scalar with its -ok flag, its CI and the CI's -ok flag (every site, the same keys)."""
    rec[key] = MISSING if value is None else float(value)
    rec[f"{key}-ok"] = 0 if value is None else 1
    rec[f"{key}-ci"] = [MISSING, MISSING] if ci is None else [float(ci[0]), float(ci[1])]
    rec[f"{key}-ci-ok"] = 0 if ci is None else 1


def _put_flat_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, metrics: Mapping[str, Any],
                  kind: str) -> None:
    """A survival (fedir.tasks.survival_metrics.site_survival_metrics: counts, C-indices with
    CIs, the within-site pair counts, the joint histogram, the KM curve) or segmentation
    evaluation (fedir.tasks.segmentation_metrics: counts, Dice and HD95 with CIs, the Dice
    histogram, the per-patient sums)."""
    counts, scalars, int_vectors, float_vectors = _FLAT_SETS[kind]
    for name in counts:
        rec[prefix + _key(name)] = int(metrics[name])
    for name in scalars:
        _put_scalar(rec, prefix + _key(name), metrics.get(name), metrics.get(f"{name}_ci"))
    for name in int_vectors:
        rec[prefix + _key(name)] = [int(v) for v in metrics[name]]
    for name in float_vectors:
        rec[prefix + _key(name)] = [float(v) for v in metrics[name]]
    site_rec[prefix + "reasons"] = json.dumps(metrics.get("reasons", {}))


def _get_flat_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, kind: str) -> dict[str, Any]:
    """The inverse of _put_flat_set."""
    counts, scalars, int_vectors, float_vectors = _FLAT_SETS[kind]
    out: dict[str, Any] = {name: int(_number(rec[prefix + _key(name)], name)) for name in counts}
    for name in scalars:
        key = prefix + _key(name)
        out[name] = _number(rec[key], name) if rec[f"{key}-ok"] else None
        ci = _numbers(rec[f"{key}-ci"], f"{name}-ci")
        out[f"{name}_ci"] = [ci[0], ci[1]] if rec[f"{key}-ci-ok"] else None
    for name in int_vectors:
        out[name] = [int(v) for v in _numbers(rec[prefix + _key(name)], name)]
    for name in float_vectors:
        out[name] = _numbers(rec[prefix + _key(name)], name)
    out["reasons"] = json.loads(str(site_rec[prefix + "reasons"]))
    return out


def _put_multiclass_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, metrics: Mapping[str, Any]) -> None:
    """A K > 2 evaluation (fedir.tasks.multiclass_metrics._metric_set): counts, the scalars
    with CIs, the (K, K) confusion counts and the (K, bins) histograms flattened row-major,
    the per-class AUCs and sensitivities with an ok flag each."""
    for name in MULTICLASS_COUNTS:
        rec[prefix + _key(name)] = int(metrics[name])
    for name in MULTICLASS_SCALARS:
        _put_scalar(rec, prefix + _key(name), metrics.get(name), metrics.get(f"{name}_ci"))
    for name in (CONFUSION, HIST_REST, HIST_CLASS):
        rec[prefix + _key(name)] = [int(v) for row in metrics[name] for v in row]
    for name in (CLASS_AUCS, SENSITIVITY):
        values = metrics[name]
        rec[prefix + _key(name)] = [MISSING if v is None else float(v) for v in values]
        rec[prefix + _key(name) + "-ok"] = [0 if v is None else 1 for v in values]
    site_rec[prefix + "reasons"] = json.dumps(metrics.get("reasons", {}))


def _get_multiclass_set(rec: MetricRecord, site_rec: ConfigRecord, prefix: str) -> dict[str, Any]:
    """The inverse of _put_multiclass_set."""
    out: dict[str, Any] = {name: int(_number(rec[prefix + _key(name)], name)) for name in MULTICLASS_COUNTS}
    k = out["classes"]
    for name in MULTICLASS_SCALARS:
        key = prefix + _key(name)
        out[name] = _number(rec[key], name) if rec[f"{key}-ok"] else None
        ci = _numbers(rec[f"{key}-ci"], f"{name}-ci")
        out[f"{name}_ci"] = [ci[0], ci[1]] if rec[f"{key}-ci-ok"] else None
    for name in (CONFUSION, HIST_REST, HIST_CLASS):
        flat = [int(v) for v in _numbers(rec[prefix + _key(name)], name)]
        if k < 1 or len(flat) % k:
            raise ValueError(f"{name}: {len(flat)} values do not make {k} rows")
        width = len(flat) // k
        out[name] = [flat[c * width:(c + 1) * width] for c in range(k)]
    for name in (CLASS_AUCS, SENSITIVITY):
        values = _numbers(rec[prefix + _key(name)], name)
        ok = _numbers(rec[prefix + _key(name) + "-ok"], name)
        out[name] = [v if flag else None for v, flag in zip(values, ok)]
    out["reasons"] = json.loads(str(site_rec[prefix + "reasons"]))
    return out


def _put_split(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, metrics: Mapping[str, Any],
               kind: str = "classification") -> None:
    """A split's metrics: per image under `prefix`, per patient (when there are) beside them;
    a survival split is one row per patient already, a segmentation split aggregated per
    patient at the site."""
    if kind in _FLAT_SETS:
        _put_flat_set(rec, site_rec, prefix, metrics, kind)
        return
    put = _put_multiclass_set if kind == MULTICLASS else _put_metric_set
    put(rec, site_rec, prefix, metrics)
    per_patient = metrics.get("per_patient")
    rec[prefix + _PATIENT_PREFIX + "ok"] = 0 if per_patient is None else 1
    if per_patient is not None:
        put(rec, site_rec, prefix + _PATIENT_PREFIX, per_patient)


def _get_split(rec: MetricRecord, site_rec: ConfigRecord, prefix: str, kind: str = "classification") -> dict[str, Any]:
    if kind in _FLAT_SETS:
        return _get_flat_set(rec, site_rec, prefix, kind)
    get = _get_multiclass_set if kind == MULTICLASS else _get_metric_set
    out = get(rec, site_rec, prefix)
    has_patients = rec.get(prefix + _PATIENT_PREFIX + "ok", 0)
    out["per_patient"] = get(rec, site_rec, prefix + _PATIENT_PREFIX) if has_patients else None
    return out


def encode_evaluation(
    site: str, metrics: Mapping[str, Any], embedding: EmbeddingMoments | None = None,
    val: Mapping[str, Any] | None = None, drift: Mapping[str, Any] | None = None,
    kind: str = "classification", sensitivity: Mapping[str, Any] | None = None,
    pretraining: Mapping[str, Mapping[str, Any]] | None = None,
) -> RecordDict:
    """A site's `fedir.metrics.site_metrics` dicts -> the reply's RecordDict (`kind` =
    "survival" / "segmentation": fedir.tasks' survival_metrics / segmentation_metrics dicts; a
    classification's with K > 2 classes: fedir.tasks.multiclass_metrics' dicts, kind
    "multiclass" on the wire; the kind travels in the ConfigRecord).

    `metrics` are the test patients', `val` the validation patients' (both with their
    `per_patient` set). `embedding` (fedir.client.embedding: counts, means and covariances
    of the model's features, small groups suppressed) travels as an ArrayRecord: Flower
    averages every MetricRecord key across sites, and only one MetricRecord may be in an
    evaluation reply. `drift` (fedir.client.drift.period_metrics: period labels and their
    aggregates, never a date) rides as JSON in the ConfigRecord, whose keys may differ
    across sites, because each site has its own periods; absent under eval.drift-period = off.
    `sensitivity` (fedir.client.input_sensitivity: per input the AUC drop with its CI, under
    data.inputs = image+clinical) rides so too, checked by check_sensitivity.
    `pretraining` (a pretraining study's, fedir.client.pretraining.pretraining_metrics of
    the "test" and "val" images) rides as JSON beside it; the reply's weight is then the
    test images' count (its classification sets score no row).
    """
    if kind == "classification" and "classes" in metrics:  # task.classes > 2: its own metric set
        kind = MULTICLASS
    weight = int(metrics["n"]) if pretraining is None else int(check_pretraining(pretraining)["test"]["n_images"])
    rec = MetricRecord({WEIGHT_KEY: weight})
    site_rec = ConfigRecord({"name": site, TASK_KEY: kind})
    if pretraining is not None:
        site_rec[PRETRAINING_KEY] = json.dumps(check_pretraining(pretraining))
    if drift is not None:
        site_rec[DRIFT_KEY] = json.dumps(check_drift(drift))
    if sensitivity is not None:
        site_rec[SENSITIVITY_KEY] = json.dumps(check_sensitivity(sensitivity))
    _put_split(rec, site_rec, "", metrics, kind)
    rec[_VAL_PREFIX + "ok"] = 0 if val is None else 1
    if val is not None:
        _put_split(rec, site_rec, _VAL_PREFIX, val, kind)
    content = RecordDict({METRICS_KEY: rec, SITE_KEY: site_rec})
    if embedding is not None:
        content[EMBEDDING_KEY] = ArrayRecord({
            "counts": Array(np.asarray(embedding.counts, dtype=np.int64)),
            "means": Array(np.asarray(embedding.means, dtype=np.float32)),
            "covs": Array(np.asarray(embedding.covs, dtype=np.float32)),
        })
    return content


def decode_evaluation(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """The inverse of encode_evaluation, on the server: (site name, the test metrics dict,
    with the validation set's under "val" when the site sent one)."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    kind = str(site_rec.get(TASK_KEY, "classification"))
    out = _get_split(rec, site_rec, "", kind)
    if rec.get(_VAL_PREFIX + "ok", 0):
        out[VAL_KEY] = _get_split(rec, site_rec, _VAL_PREFIX, kind)
    if DRIFT_KEY in site_rec:
        out[DRIFT_KEY] = check_drift(json.loads(str(site_rec[DRIFT_KEY])))
    if SENSITIVITY_KEY in site_rec:
        out[SENSITIVITY_KEY] = check_sensitivity(json.loads(str(site_rec[SENSITIVITY_KEY])))
    if PRETRAINING_KEY in site_rec:  # flat beside each split's metrics: the run store keeps every scalar
        pretraining = check_pretraining(json.loads(str(site_rec[PRETRAINING_KEY])))
        out.update(pretraining["test"])
        if VAL_KEY in out:
            out[VAL_KEY].update(pretraining["val"])
    if EMBEDDING_KEY in content.array_records:
        arrays = content.array_records[EMBEDDING_KEY]
        out["embedding"] = EmbeddingMoments(
            counts=arrays["counts"].numpy(),
            means=arrays["means"].numpy().astype(np.float64),
            covs=arrays["covs"].numpy().astype(np.float64),
        )
    return str(site_rec["name"]), out


def check_pretraining(pretraining: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A pretraining evaluation as it may cross: for each of PRETRAINING_SPLITS exactly its
    image count (a non-negative int) and PRETRAINING_SCALARS (finite numbers or None);
    a ValueError for anything else (a server refuses a malformed reply)."""
    if set(pretraining) != set(PRETRAINING_SPLITS):
        raise ValueError(f"pretraining: splits {sorted(pretraining)}, expected {list(PRETRAINING_SPLITS)}")
    out: dict[str, dict[str, Any]] = {}
    for split in PRETRAINING_SPLITS:
        entry = pretraining[split]
        if set(entry) != {*PRETRAINING_COUNTS, *PRETRAINING_SCALARS}:
            raise ValueError(f"pretraining {split}: keys {sorted(entry)}")
        n = entry["n_images"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"pretraining {split}: n_images must be a count, got {n!r}")
        values: dict[str, Any] = {"n_images": n}
        for name in PRETRAINING_SCALARS:
            value = entry[name]
            values[name] = None if value is None else _number(value, name)
            if value is not None and not math.isfinite(values[name]):
                raise ValueError(f"pretraining {split}: {name} is not finite")
        out[split] = values
    return out


DRIFT_UNITS = ("year", "quarter")
_PERIOD_LABEL = {"year": re.compile(r"[0-9]{4}"), "quarter": re.compile(r"[0-9]{4}-Q[1-4]")}
_PERIOD_SHOWN = ("period", "n_patients", "positives", "auc", "auc_ci")


def check_drift(drift: Mapping[str, Any]) -> dict[str, Any]:
    """A site's per-period entry as it may cross: ``{"unit", "periods", "reason"}`` with each
    period ``{"period": label, "suppressed": reason}`` or exactly ``_PERIOD_SHOWN``, labels of
    the unit's form ("2021", "2021-Q3"), counts as integers, AUC and CI bounds in [0, 1] or
    null. Both sides call it, so that a date, an identifier or a stray field cannot pass:
    ValueError names what is wrong."""
    if set(drift) != {"unit", "periods", "reason"} or drift["unit"] not in DRIFT_UNITS:
        raise ValueError(f"drift: expected unit (one of {', '.join(DRIFT_UNITS)}), periods and reason")
    periods: list[dict[str, Any]] = []
    for period in drift["periods"]:
        label = period.get("period") if isinstance(period, Mapping) else None
        if not isinstance(label, str) or not _PERIOD_LABEL[drift["unit"]].fullmatch(label):
            raise ValueError(f"drift: a period label is not a {drift['unit']} label")
        if "suppressed" in period:
            if set(period) != {"period", "suppressed"} or not isinstance(period["suppressed"], str):
                raise ValueError(f"drift: suppressed period {label} carries more than its reason")
            periods.append({"period": label, "suppressed": period["suppressed"]})
            continue
        if set(period) != set(_PERIOD_SHOWN):
            raise ValueError(f"drift: period {label} must carry exactly {', '.join(_PERIOD_SHOWN)}")
        auc, ci = period["auc"], period["auc_ci"]
        periods.append({
            "period": label,
            "n_patients": int(_number(period["n_patients"], "n_patients")),
            "positives": int(_number(period["positives"], "positives")),
            "auc": None if auc is None else _unit_interval(auc, "auc"),
            "auc_ci": None if ci is None else [_unit_interval(v, "auc_ci") for v in _numbers(ci, "auc_ci")[:2]],
        })
    reason = drift["reason"]
    if reason is not None and not isinstance(reason, str):
        raise ValueError("drift: reason must be text or null")
    return {"unit": drift["unit"], "periods": periods, "reason": reason}


def _unit_interval(value: object, key: str, what: str = "drift") -> float:
    number = _number(value, key)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{what}: {key} {number} is outside [0, 1]")
    return number


_SENSITIVITY_FIELDS = ("n_patients", "positives", "auc", "repeats", "blur", "inputs", "reason")
_SENSITIVITY_INPUT = ("input", "change", "auc", "drop", "drop_ci", "drop_se")
_SENSITIVITY_NAME = re.compile(r"clin_[A-Za-z0-9_]{1,64}")
SENSITIVITY_CHANGES = {"permuted": _SENSITIVITY_NAME, "blank": re.compile("image"), "blurred": re.compile("image")}


def check_sensitivity(sensitivity: Mapping[str, Any]) -> dict[str, Any]:
    """A site's sensitivity entry as it may cross: exactly ``_SENSITIVITY_FIELDS``, counts as
    integers, AUCs in [0, 1] or null, and per input exactly ``_SENSITIVITY_INPUT``: a clin_*
    column name (the names the feature query already shares) permuted, or "image" blank or
    blurred; a drop in [-1, 1] with its CI and standard error, or nulls. Both sides call it,
    so that no score, identifier or stray field can pass: ValueError names what is wrong."""
    what = "sensitivity"
    if set(sensitivity) != set(_SENSITIVITY_FIELDS):
        raise ValueError(f"{what}: expected exactly {', '.join(_SENSITIVITY_FIELDS)}")
    inputs: list[dict[str, Any]] = []
    for entry in sensitivity["inputs"]:
        if not isinstance(entry, Mapping) or set(entry) != set(_SENSITIVITY_INPUT):
            raise ValueError(f"{what}: an input must carry exactly {', '.join(_SENSITIVITY_INPUT)}")
        change, name = entry["change"], entry["input"]
        pattern = SENSITIVITY_CHANGES.get(change) if isinstance(change, str) else None
        if pattern is None or not isinstance(name, str) or not pattern.fullmatch(name):
            raise ValueError(f"{what}: input {str(name)[:70]!r} changed {str(change)[:20]!r} is not a clin_* column "
                             "permuted or the image blank or blurred")
        drop, ci, se = entry["drop"], entry["drop_ci"], entry["drop_se"]
        if drop is not None and not -1.0 <= _number(drop, "drop") <= 1.0:
            raise ValueError(f"{what}: drop {drop} is outside [-1, 1]")
        inputs.append({
            "input": name, "change": change,
            "auc": None if entry["auc"] is None else _unit_interval(entry["auc"], "auc", what),
            "drop": None if drop is None else _number(drop, "drop"),
            "drop_ci": None if ci is None else [_number(v, "drop_ci") for v in _numbers(ci, "drop_ci")[:2]],
            "drop_se": None if se is None else abs(_number(se, "drop_se")),
        })
    reason = sensitivity["reason"]
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"{what}: reason must be text or null")
    auc = sensitivity["auc"]
    return {"n_patients": int(_number(sensitivity["n_patients"], "n_patients")),
            "positives": int(_number(sensitivity["positives"], "positives")),
            "auc": None if auc is None else _unit_interval(auc, "auc", what),
            "repeats": int(_number(sensitivity["repeats"], "repeats")),
            "blur": _number(sensitivity["blur"], "blur"), "inputs": inputs, "reason": reason}


def encode_training(
    site: str,
    arrays: ArrayRecord,
    *,
    loss: float | None,
    steps: int,
    n_labelled: int,
    n_unlabelled: int,
    label_counts: Mapping[int, int],
    num_classes: int,
    skipped: Mapping[str, int],
    card: Mapping[str, Any] | None = None,
    foreground: ForegroundCounts | None = None,
    weight: int | None = None,
) -> RecordDict:
    """A site's training reply: its update (`arrays`, from encode_weights), the weight of
    the update (`weight`: the rows it trained on; None = n_labelled, which a label-free
    objective such as SimCLR does not train on alone), its loss, and its data counts.

    `label_counts` (labelled training patients per class) is what the server's
    site-label association test needs; `skipped` counts unreadable files by reason (never paths).
    `card`, the site's k-suppressed data card (fedir.client.datacard), rides along as JSON
    in the ConfigRecord in a node's first reply only (ConfigRecords may differ across sites).
    `foreground` (a segmentation site's, every round, so every site sends the same keys) is
    what the server's foreground-by-site test needs (ForegroundCounts).
    """
    rec = MetricRecord(
        {
            WEIGHT_KEY: int(n_labelled if weight is None else weight),
            "train-loss": MISSING if loss is None else float(loss),
            "train-loss-ok": 0 if loss is None else 1,
            "steps": int(steps),
            "n-labelled": int(n_labelled),
            "n-unlabelled": int(n_unlabelled),
            "label-counts": [int(label_counts.get(c, 0)) for c in range(num_classes)],
        }
    )
    if foreground is not None:
        rec[_FOREGROUND_PATIENTS] = int(foreground.patients)
        rec[_FOREGROUND_K] = int(foreground.k)
        rec[_FOREGROUND_COUNTS] = [int(c) for row in foreground.counts for c in row]
    site_rec = ConfigRecord({"name": site, "skipped": json.dumps(dict(skipped))})
    if card is not None:
        site_rec[CARD_KEY] = json.dumps(card)
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: rec, SITE_KEY: site_rec})


_FOREGROUND_PATIENTS = "foreground-patients"
_FOREGROUND_K = "foreground-k"
_FOREGROUND_COUNTS = "foreground-counts"  # rows FOREGROUND_NAMES, columns FOREGROUND_BIN_NAMES, row-major


def decode_training(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """The inverse of encode_training: (site name, aggregates)."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    out = {
        "train_loss": _number(rec["train-loss"], "train-loss") if rec["train-loss-ok"] else None,
        "steps": int(_number(rec["steps"], "steps")),
        "n_labelled": int(_number(rec["n-labelled"], "n-labelled")),
        "n_unlabelled": int(_number(rec["n-unlabelled"], "n-unlabelled")),
        "label_counts": {c: int(v) for c, v in enumerate(_numbers(rec["label-counts"], "label-counts"))},
        "skipped": json.loads(str(site_rec["skipped"])),
    }
    if CARD_KEY in site_rec:
        out["card"] = json.loads(str(site_rec[CARD_KEY]))
    if _FOREGROUND_COUNTS in rec:
        flat = [int(v) for v in _numbers(rec[_FOREGROUND_COUNTS], _FOREGROUND_COUNTS)]
        width = len(FOREGROUND_BIN_NAMES)
        out["foreground"] = ForegroundCounts(
            int(_number(rec[_FOREGROUND_PATIENTS], _FOREGROUND_PATIENTS)), int(_number(rec[_FOREGROUND_K], _FOREGROUND_K)),
            tuple(tuple(flat[i:i + width]) for i in range(0, len(flat), width))).as_dict()
    return str(site_rec["name"]), out


# ---- secure aggregation: Flower's legacy fit layout (privacy.secure-aggregation) -------------
#
# Flower 1.41's SecAggPlusWorkflow drives the legacy strategy API. The train message of its
# third stage carries a legacy FitIns ("fitins.parameters": the arrays by position, as .npy
# bytes, no names; "fitins.config"), and `secaggplus_mod` at the site reads the reply as a
# legacy FitRes ("fitres.parameters", "fitres.num_examples", "fitres.metrics",
# "fitres.status"), then masks the parameters and empties every ArrayRecord before the reply
# leaves. So the server names the positions in the config (SECURE_NAMES_KEY), the site
# translates the FitIns into a plain train message for its handler and the handler's reply
# into a FitRes, and the site's aggregates (encode_training's "metrics" and "site" records)
# travel beside the FitRes records, where decode_training reads them as in any round.

SECURE_NAMES_KEY = "array-names"
_FITINS_ARRAYS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"
_FITRES_ARRAYS = "fitres.parameters"


def encode_secure_config(config: ConfigRecord, server_round: int, names: Sequence[str]) -> dict[str, Any]:
    """A round's config as a legacy FitIns config (Flower's legacy strategies take a dict):
    the round config of every train message, its round number (which the Message-API
    strategies add themselves) and the names of the model's arrays, in the order sent."""
    return {**config, ROUND_KEY: int(server_round), SECURE_NAMES_KEY: [str(n) for n in names]}


def is_secure_instruction(content: RecordDict) -> bool:
    """Whether a train message is SecAgg+'s legacy FitIns rather than a plain instruction."""
    return _FITINS_ARRAYS in content.array_records


def _by_position(record: ArrayRecord) -> list[np.ndarray]:
    """A legacy record's arrays in their positions (keys "0", "1", ...: sorted as numbers)."""
    return [bytes_to_ndarray(record[key].data) for key in sorted(record, key=int)]


def decode_secure_instruction(content: RecordDict) -> RecordDict:
    """SecAgg+'s FitIns -> a plain train message's content (read by decode_instruction):
    the global arrays under their names, and the round's config."""
    config = content.config_records[_FITINS_CONFIG]
    names = [str(n) for n in config[SECURE_NAMES_KEY]]  # type: ignore[union-attr]
    values = _by_position(content.array_records[_FITINS_ARRAYS])
    if len(values) != len(names):
        raise ValueError(f"a secure-aggregation instruction with {len(values)} arrays names {len(names)}")
    return RecordDict({ARRAYS_KEY: ArrayRecord({n: Array(v) for n, v in zip(names, values)}), CONFIG_KEY: config})


def encode_secure_training(reply: RecordDict, names: Sequence[str]) -> RecordDict:
    """A site's training reply (encode_training) as the legacy FitRes `secaggplus_mod`
    masks: the update in the order of `names` (those the instruction carried), weighted by
    the reply's `num-examples`, with the reply's aggregate records beside it."""
    arrays = reply.array_records[ARRAYS_KEY]
    if sorted(arrays) != sorted(names):
        raise ValueError(f"the update's arrays {sorted(arrays)[:3]}... are not those the instruction named")
    metrics = reply.metric_records[METRICS_KEY]
    parameters = Parameters(tensors=[ndarray_to_bytes(arrays[n].numpy()) for n in names], tensor_type="numpy.ndarray")
    fitres = FitRes(Status(Code.OK, ""), parameters, int(_number(metrics[WEIGHT_KEY], WEIGHT_KEY)), {})
    content = legacy.fitres_to_recorddict(fitres, keep_input=False)
    content[METRICS_KEY] = metrics
    content[SITE_KEY] = reply.config_records[SITE_KEY]
    return content


def is_secure_training(content: RecordDict) -> bool:
    """Whether a reply is a site's masked training reply (SecAgg+'s third stage)."""
    return _FITRES_ARRAYS in content.array_records and METRICS_KEY in content.metric_records


def decode_secure_aggregate(record: ArrayRecord, template: ArrayRecord) -> ArrayRecord:
    """The workflow's aggregate (legacy positions, float64) -> the model's arrays under their
    names, in the dtypes and shapes of `template` (the arrays sent)."""
    values = _by_position(record)
    if len(values) != len(template):
        raise ValueError(f"secure aggregation returned {len(values)} arrays for a model of {len(template)}")
    return ArrayRecord({name: Array(np.asarray(v, dtype=np.dtype(ref.dtype)).reshape(ref.shape))
                        for (name, ref), v in zip(template.items(), values)})


# ---- cross-site evaluation (after the last round) -------------------------------------------

CROSS_SITE_ACTION = "evaluate.cross_site"
_MODEL_PREFIX = "model-"


def encode_cross_site_models(models: Mapping[str, ArrayRecord], config: ConfigRecord) -> RecordDict:
    """The server's cross-site request (sent only under `bias.cross-site = true`): every
    site's model, keyed by position, with the positions' site names in a ConfigRecord
    (record keys must be plain identifiers), and the round's config (encode_round_config)."""
    names = list(models)
    content = RecordDict({CONFIG_KEY: config, "models": ConfigRecord({"names": json.dumps(names)})})
    for i, name in enumerate(names):
        content[f"{_MODEL_PREFIX}{i}"] = models[name]
    return content


def decode_cross_site_models(content: RecordDict) -> tuple[dict[str, ArrayRecord], ConfigRecord]:
    """The inverse of encode_cross_site_models: ({site: its model}, the round's config)."""
    names = json.loads(str(content.config_records["models"]["names"]))
    models = {name: content.array_records[f"{_MODEL_PREFIX}{i}"] for i, name in enumerate(names)}
    return models, content.config_records[CONFIG_KEY]


def encode_cross_site(site: str, row: Mapping[str, Mapping[str, Any]], *, metric: str) -> RecordDict:
    """One row of the cross-site matrix: each model's `metric` (the task kind's
    CROSS_SITE_METRIC, fedir.tasks: a classifier's AUC, a segmentation's per-patient Dice),
    its site-computed CI and its count of scored test images, on this site's test patients.
    Only these three per model leave the site, under keys named for the metric (so the
    server's decode_cross_site refuses a row of another kind's metric)."""
    names = list(row)
    value = [row[m].get(metric) for m in names]
    ci = [row[m].get(f"{metric}_ci") for m in names]
    rec = MetricRecord({
        metric: [MISSING if v is None else float(v) for v in value],
        f"{metric}-ok": [0 if v is None else 1 for v in value],
        f"{metric}-ci": [float(v) for c in ci for v in (c if c is not None else (MISSING, MISSING))],
        f"{metric}-ci-ok": [0 if c is None else 1 for c in ci],
        "n": [int(row[m]["n"]) for m in names],
    })
    return RecordDict({METRICS_KEY: rec, SITE_KEY: ConfigRecord({"name": site, "models": json.dumps(names)})})


def decode_cross_site(content: RecordDict, *, metric: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(evaluating site, {model site: {metric, f"{metric}_ci", "n"}}); KeyError naming the
    key when the row does not carry `metric` (a site of another task kind)."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    names = json.loads(str(site_rec["models"]))
    keys = (metric, f"{metric}-ok", f"{metric}-ci-ok", "n")
    missing = [k for k in (*keys, f"{metric}-ci") if k not in rec]
    if missing:
        raise KeyError(f"cross-site row without {', '.join(missing)}")
    ci = _numbers(rec[f"{metric}-ci"], f"{metric}-ci")
    value, ok, ci_ok, n = (_numbers(rec[k], k) for k in keys)
    out = {}
    for i, name in enumerate(names):
        out[name] = {
            metric: value[i] if ok[i] else None,
            f"{metric}_ci": [ci[2 * i], ci[2 * i + 1]] if ci_ok[i] else None,
            "n": int(n[i]),
        }
    return str(site_rec["name"]), out


# ---- the feature-statistics query (tabular sites, before round 1) -------------------------


def encode_feature_query() -> RecordDict:
    """The server's feature-statistics query: it carries nothing but its message type."""
    return RecordDict({CONFIG_KEY: ConfigRecord()})


def encode_feature_sums(features: list[str], sums: FeatureSums | None) -> RecordDict:
    """A site's reply to the feature-statistics query; an imaging site sends n = 0."""
    rec = MetricRecord(
        {
            "n": 0 if sums is None else sums.n,
            "sum": [] if sums is None else [float(v) for v in sums.total],
            "sum-sq": [] if sums is None else [float(v) for v in sums.total_sq],
        }
    )
    return RecordDict({STATS_KEY: rec, NAMES_KEY: ConfigRecord({"names": ";".join(features)})})


def decode_feature_sums(content: RecordDict) -> tuple[list[str], FeatureSums | None]:
    rec = content.metric_records[STATS_KEY]
    names = [n for n in str(content.config_records[NAMES_KEY]["names"]).split(";") if n]
    if int(_number(rec["n"], "n")) == 0:
        return names, None
    return names, FeatureSums(
        int(_number(rec["n"], "n")), np.asarray(rec["sum"], dtype=np.float64), np.asarray(rec["sum-sq"], dtype=np.float64)
    )


# ---- model weights -------------------------------------------------------------------------
#
# The one codec of a state dict, both directions, over numpy arrays (the torch side converts
# with `.numpy()` / `torch.from_numpy`, fedir.models). Sites send their update with it, the
# server its initial model and the template its validation checks replies against, so the
# three cannot disagree about what crosses: which entries stay at a site, the precision, and
# the shapes Flower's differential privacy needs.


def encode_weights(
    arrays: Mapping[str, np.ndarray], *, kept: Collection[str] = (), dtype: str = "float32",
    dp: bool = False,
) -> ArrayRecord:
    """A state dict as the ArrayRecord that crosses the boundary.

    Args:
        arrays: the model's entries (name -> array), in the model's own shapes and dtypes.
        kept: entries that stay at the site (fedir.models.kept_keys): never encoded.
        dtype: `train.update-dtype`, the precision of floating-point entries; integer
            buffers (BatchNorm's counters) keep theirs.
        dp: under differential privacy every entry becomes float32 with at least one
            dimension, because Flower's clipping scales every array of the record.
    """
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"train.update-dtype = {dtype!r}: choose {' or '.join(UPDATE_DTYPES)}")
    out = {}
    for name, value in arrays.items():
        if name in kept:
            continue
        value = np.asarray(value)
        if dp:
            value = value.astype(np.float32).reshape(value.shape or (1,))
        elif np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype, copy=False)
        out[name] = Array(value)
    return ArrayRecord(out)


def decode_weights(
    record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The inverse of encode_weights: float16 widened to float32 (a site's update is
    trained and averaged in float32), and, given the model's `shapes`, DP's one-element
    arrays back to the model's 0-d entries. Dtypes are otherwise those sent: loading into
    a model casts (an int buffer sent as float32 under DP stays an int buffer)."""
    out = {}
    for name, array in record.items():
        value = array.numpy()
        if value.dtype == np.float16:
            value = value.astype(np.float32)
        if shapes is not None and shapes.get(name) == () and value.shape == (1,):
            value = value.reshape(())
        out[name] = value
    return out


def widened(record: ArrayRecord) -> ArrayRecord:
    """A reply's update as the server averages it: float16 widened to float32, the rest
    unchanged (the same record when nothing was sent in float16)."""
    if not any(array.dtype == "float16" for array in record.values()):
        return record
    return encode_weights(decode_weights(record))


def payload_bytes(record: ArrayRecord) -> int:
    """Serialised size of the record's arrays, as Flower sends them."""
    return sum(len(arr.data) for arr in record.values())


# ---- a failed site's reason ------------------------------------------------------------

# Flower's error reply for a ClientApp that raised: "<class 'T'>:<'message'>"; through Ray,
# the message is Ray's remote traceback ending in "... occurred. Message: <the site's text>".
_FLOWER_REASON = re.compile(r"<class '[^']*'>:<'(.*)'>", re.DOTALL)
_RAY_MESSAGE = "Message: "


def error_text(reason: str | None) -> str:
    """The site's own message from the reason of a Flower error reply, on one line.

    The coordinator records it (and, when every site fails, stops with it); Flower's class
    wrapper and Ray's traceback around it say nothing a hospital can act on. Other reasons
    (a node that went away) come back as they are, on one line.
    """
    if not reason:
        return "no reason given"
    match = _FLOWER_REASON.fullmatch(reason.strip())
    text = match.group(1) if match else reason
    if _RAY_MESSAGE in text:
        text = text.rsplit(_RAY_MESSAGE, 1)[1]
    return " ".join(text.split()) or reason
