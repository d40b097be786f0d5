"""What crosses the trust boundary, defined once: every record between a site and the coordinator.

Flower 1.41 aborts a round when one site's MetricRecord has a key another lacks, and
MetricRecord values can only be numbers or lists of numbers. So every site sends the same
keys: a metric that cannot be computed is sent as -1 with its `-ok` flag at 0, and the
human reason travels in a ConfigRecord beside it (as JSON text, so that sites with
different reasons still send the same keys). Everything here is an aggregate: counts,
losses, metrics and fixed-bin histograms; never an image, an identifier or a per-patient
value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedir.metrics import COUNTS, HISTOGRAMS, SCALAR_METRICS

METRICS_KEY = "metrics"
SITE_KEY = "site"
ARRAYS_KEY = "arrays"
WEIGHT_KEY = "num-examples"
CARD_KEY = "data-card"
EMBEDDING_KEY = "embedding"

MISSING = -1.0


STATS_KEY = "feature-sums"
NAMES_KEY = "feature-names"
MEAN_KEY = "feature-mean"  # the federation's standardisation, in each train/evaluate config
STD_KEY = "feature-std"
UPDATE_DTYPES = ("float32", "float16")  # train.update-dtype: the precision of a site's upload


@dataclass(frozen=True)
class EmbeddingMoments:
    """Count, mean and covariance of the features per class and overall (the last row)."""

    counts: np.ndarray  # (C + 1,) int
    means: np.ndarray  # (C + 1, d)
    covs: np.ndarray  # (C + 1, d, d)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])



@dataclass(frozen=True)
class FeatureSums:
    """n, sum and sum of squares per feature: all that standardisation needs, no rows."""

    n: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "FeatureSums":
        x64 = x.astype(np.float64)
        return cls(int(x.shape[0]), x64.sum(axis=0), (x64**2).sum(axis=0))

    def __add__(self, other: "FeatureSums") -> "FeatureSums":
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



def _key(name: str) -> str:
    return name.replace("_", "-")


def encode_evaluation(
    site: str, metrics: Mapping[str, Any], embedding: EmbeddingMoments | None = None
) -> RecordDict:
    """A site's `fedir.metrics.site_metrics` dict -> the reply's RecordDict.

    `embedding` (fedir.client.embedding: counts, means and covariances of the model's features,
    small groups suppressed) travels as an ArrayRecord: Flower averages every MetricRecord
    key across sites, and only one MetricRecord may be in an evaluation reply.
    """
    rec = MetricRecord({WEIGHT_KEY: int(metrics["n"])})
    for name in COUNTS:
        rec[_key(name)] = int(metrics[name])
    for name in SCALAR_METRICS:
        value, ci = metrics.get(name), metrics.get(f"{name}_ci")
        rec[_key(name)] = MISSING if value is None else float(value)
        rec[f"{_key(name)}-ok"] = 0 if value is None else 1
        rec[f"{_key(name)}-ci"] = [MISSING, MISSING] if ci is None else [float(ci[0]), float(ci[1])]
        rec[f"{_key(name)}-ci-ok"] = 0 if ci is None else 1
    for name in HISTOGRAMS:
        rec[_key(name)] = [int(v) for v in metrics[name]]
    site_rec = ConfigRecord({"name": site, "reasons": json.dumps(metrics.get("reasons", {}))})
    content = RecordDict({METRICS_KEY: rec, SITE_KEY: site_rec})
    if embedding is not None:
        content[EMBEDDING_KEY] = ArrayRecord({
            "counts": Array(np.asarray(embedding.counts, dtype=np.int64)),
            "means": Array(np.asarray(embedding.means, dtype=np.float32)),
            "covs": Array(np.asarray(embedding.covs, dtype=np.float32)),
        })
    return content


def decode_evaluation(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """The inverse of encode_evaluation, on the server: (site name, metrics dict)."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    out: dict[str, Any] = {name: int(rec[_key(name)]) for name in COUNTS}
    for name in SCALAR_METRICS:
        out[name] = float(rec[_key(name)]) if rec[f"{_key(name)}-ok"] else None
        ci = rec[f"{_key(name)}-ci"]
        out[f"{name}_ci"] = [float(ci[0]), float(ci[1])] if rec[f"{_key(name)}-ci-ok"] else None
    for name in HISTOGRAMS:
        out[name] = [int(v) for v in rec[_key(name)]]
    out["reasons"] = json.loads(str(site_rec["reasons"]))
    if EMBEDDING_KEY in content.array_records:
        arrays = content.array_records[EMBEDDING_KEY]
        out["embedding"] = EmbeddingMoments(
            counts=arrays["counts"].numpy(),
            means=arrays["means"].numpy().astype(np.float64),
            covs=arrays["covs"].numpy().astype(np.float64),
        )
    return str(site_rec["name"]), out


def encode_training(
    site: str,
    *,
    loss: float | None,
    steps: int,
    n_labelled: int,
    n_unlabelled: int,
    label_counts: Mapping[int, int],
    num_classes: int,
    skipped: Mapping[str, int],
    card: Mapping[str, Any] | None = None,
) -> tuple[MetricRecord, ConfigRecord]:
    """A site's training aggregates: the weight of its update, its loss, and its data counts.

    `label_counts` (labelled training patients per class) is what the server's
    site-label association test needs; `skipped` counts unreadable files by reason (never paths).
    `card`, the site's k-suppressed data card (fedir.client.datacard), rides along as JSON
    in the ConfigRecord in a node's first reply only (ConfigRecords may differ across sites).
    """
    rec = MetricRecord(
        {
            WEIGHT_KEY: int(n_labelled),
            "train-loss": MISSING if loss is None else float(loss),
            "train-loss-ok": 0 if loss is None else 1,
            "steps": int(steps),
            "n-labelled": int(n_labelled),
            "n-unlabelled": int(n_unlabelled),
            "label-counts": [int(label_counts.get(c, 0)) for c in range(num_classes)],
        }
    )
    site_rec = ConfigRecord({"name": site, "skipped": json.dumps(dict(skipped))})
    if card is not None:
        site_rec[CARD_KEY] = json.dumps(card)
    return rec, site_rec


def decode_training(content: RecordDict) -> tuple[str, dict[str, Any]]:
    """The inverse of encode_training: (site name, aggregates)."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    out = {
        "train_loss": float(rec["train-loss"]) if rec["train-loss-ok"] else None,
        "steps": int(rec["steps"]),
        "n_labelled": int(rec["n-labelled"]),
        "n_unlabelled": int(rec["n-unlabelled"]),
        "label_counts": {c: int(v) for c, v in enumerate(rec["label-counts"])},
        "skipped": json.loads(str(site_rec["skipped"])),
    }
    if CARD_KEY in site_rec:
        out["card"] = json.loads(str(site_rec[CARD_KEY]))
    return str(site_rec["name"]), out


# ---- cross-site evaluation (after the last round) -------------------------------------------

CROSS_SITE_ACTION = "evaluate.cross_site"
_MODEL_PREFIX = "model-"


def encode_cross_site_models(models: Mapping[str, ArrayRecord]) -> RecordDict:
    """The server's cross-site request: every site's model, keyed by position, with the
    positions' site names in a ConfigRecord (record keys must be plain identifiers)."""
    names = list(models)
    content = RecordDict({"config": ConfigRecord(), "models": ConfigRecord({"names": json.dumps(names)})})
    for i, name in enumerate(names):
        content[f"{_MODEL_PREFIX}{i}"] = models[name]
    return content


def decode_cross_site_models(content: RecordDict) -> dict[str, ArrayRecord]:
    names = json.loads(str(content.config_records["models"]["names"]))
    return {name: content.array_records[f"{_MODEL_PREFIX}{i}"] for i, name in enumerate(names)}


def encode_cross_site(site: str, row: Mapping[str, Mapping[str, Any]]) -> RecordDict:
    """One row of the cross-site matrix: each model's AUC (and CI) on this site's test patients."""
    names = list(row)
    auc = [row[m].get("auc") for m in names]
    ci = [row[m].get("auc_ci") for m in names]
    rec = MetricRecord({
        "auc": [MISSING if a is None else float(a) for a in auc],
        "auc-ok": [0 if a is None else 1 for a in auc],
        "auc-ci": [float(v) for c in ci for v in (c if c is not None else (MISSING, MISSING))],
        "auc-ci-ok": [0 if c is None else 1 for c in ci],
        "n": [int(row[m]["n"]) for m in names],
    })
    return RecordDict({METRICS_KEY: rec, SITE_KEY: ConfigRecord({"name": site, "models": json.dumps(names)})})


def decode_cross_site(content: RecordDict) -> tuple[str, dict[str, dict[str, Any]]]:
    """(evaluating site, {model site: {"auc", "auc_ci", "n"}})."""
    rec = content.metric_records[METRICS_KEY]
    site_rec = content.config_records[SITE_KEY]
    names = json.loads(str(site_rec["models"]))
    ci = list(rec["auc-ci"])
    out = {}
    for i, name in enumerate(names):
        out[name] = {
            "auc": float(rec["auc"][i]) if rec["auc-ok"][i] else None,
            "auc_ci": [float(ci[2 * i]), float(ci[2 * i + 1])] if rec["auc-ci-ok"][i] else None,
            "n": int(rec["n"][i]),
        }
    return str(site_rec["name"]), out


# ---- the feature-statistics query (tabular sites, before round 1) -------------------------


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
    if int(rec["n"]) == 0:
        return names, None
    return names, FeatureSums(
        int(rec["n"]), np.asarray(rec["sum"], dtype=np.float64), np.asarray(rec["sum-sq"], dtype=np.float64)
    )


# ---- model weights -------------------------------------------------------------------------

def from_wire(record: ArrayRecord) -> ArrayRecord:
    """The same record with every float16 array widened to float32 (others unchanged)."""
    if not any(arr.dtype == "float16" for arr in record.values()):
        return record
    return ArrayRecord(
        {k: Array(arr.numpy().astype(np.float32)) if arr.dtype == "float16" else arr
         for k, arr in record.items()}
    )


def payload_bytes(record: ArrayRecord) -> int:
    """Serialised size of the record's arrays, as Flower sends them."""
    return sum(len(arr.data) for arr in record.values())
