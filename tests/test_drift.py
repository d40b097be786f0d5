"""Drift over time at a site: the manifest's `acquired` column, the test metrics per period
(fedir.client.drift) and what of them may cross (fedir.protocol.check_drift)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from fedir.client.drift import GIVES_BACK, NO_DATES, period_metrics
from fedir.client.inputs import check_manifest
from fedir.client.manifest import Acquired, ManifestError, acquired_by_patient, parse_acquired, read_manifest, write_manifest
from fedir.metrics import site_metrics
from fedir.protocol import DRIFT_KEY, SITE_KEY, check_drift, decode_evaluation, encode_evaluation
from tests.test_protocol import _metrics


@pytest.mark.parametrize(("raw", "expected"), [
    ("2021", Acquired(2021)),
    ("2021-Q3", Acquired(2021, 3)),
    ("2021-08-14", Acquired(2021, 3, dt.date(2021, 8, 14))),
    (" 2020-01-01 ", Acquired(2020, 1, dt.date(2020, 1, 1))),
    ("", None),
])
def test_acquired_accepts_a_date_a_year_or_a_quarter(raw: str, expected: Acquired | None) -> None:
    assert parse_acquired(raw, "m.csv, row 3", 3) == expected


def test_period_labels_follow_the_unit() -> None:
    assert Acquired(2021, 3, dt.date(2021, 8, 14)).period("year") == "2021"
    assert Acquired(2021, 3, dt.date(2021, 8, 14)).period("quarter") == "2021-Q3"
    assert Acquired(2021).period("quarter") is None  # a bare year has no quarter


@pytest.mark.parametrize("raw", ["7", "2021-13-01", "2021-02-30", "2021-Q5", "14/08/2021", "1850", "2021-8-14"])
def test_a_bad_acquired_value_is_refused_with_its_row(tmp_path: Path, raw: str) -> None:
    (tmp_path / "a.npy").write_bytes(b"")
    write_manifest(tmp_path, [{"patient_id": "p1", "path": "a.npy", "label": 0, "acquired": "2021"},
                              {"patient_id": "p2", "path": "b.npy", "label": 1, "acquired": raw}])
    for read in (read_manifest, acquired_by_patient):
        with pytest.raises(ManifestError) as info:
            read(tmp_path)
        assert "row 3" in str(info.value) and repr(raw) in str(info.value)
        assert info.value.public.startswith("manifest.csv: row 3: an acquired value is not a date")
        assert raw not in info.value.public and str(tmp_path) not in info.value.public


def test_a_tabular_sites_bad_acquired_value_is_refused_before_the_run(tmp_path: Path) -> None:
    write_manifest(tmp_path, [{"patient_id": "p1", "label": 0, "clin_age": 60, "acquired": "2021-Q0"}])
    with pytest.raises(ManifestError, match="row 2"):
        check_manifest(str(tmp_path), "auto")


def test_a_patient_belongs_to_their_earliest_row(tmp_path: Path) -> None:
    write_manifest(tmp_path, [{"patient_id": "p1", "path": "a", "acquired": "2022-03-01"},
                              {"patient_id": "p1", "path": "b", "acquired": "2021-Q4"},
                              {"patient_id": "p2", "path": "c", "acquired": ""},
                              {"patient_id": "p3", "path": "d", "acquired": "2020"}])
    assert acquired_by_patient(tmp_path) == {"p1": Acquired(2021, 4), "p3": Acquired(2020)}
    write_manifest(tmp_path, [{"patient_id": "p1", "path": "a"}])
    assert acquired_by_patient(tmp_path) == {}


def _test_set(rng: np.random.Generator, periods: dict[int, int]) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Two images per patient, `periods` = {year: patients}; the model is worse from 2022 on."""
    labels, scores, patients, acquired = [], [], [], {}
    for year, count in periods.items():
        for i in range(count):
            pid = f"{year}-{i}"
            y = i % 2
            acquired[pid] = Acquired(year, 2, dt.date(year, 5, 1 + i % 28))
            signal = 1.5 if year < 2022 else 0.3
            for _ in range(2):
                labels.append(y)
                scores.append(1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal()))))
                patients.append(pid)
    return np.array(labels), np.array(scores), patients, acquired


def test_each_periods_metrics_are_site_metrics_on_its_patients() -> None:
    labels, scores, patients, acquired = _test_set(np.random.default_rng(0), {2020: 12, 2021: 14, 2023: 10})
    drift = period_metrics(labels, scores, patients, acquired, "year", n_boot=200, seed=7)
    assert drift["unit"] == "year" and drift["reason"] is None
    assert [p["period"] for p in drift["periods"]] == ["2020", "2021", "2023"]
    for period in drift["periods"]:
        keep = np.array([p.startswith(period["period"]) for p in patients])
        expected = site_metrics(labels[keep], scores[keep], [p for p, k in zip(patients, keep) if k],
                                n_boot=200, seed=7)["per_patient"]
        assert period == {"period": period["period"], "n_patients": expected["n_patients"],
                          "positives": expected["positives"], "auc": expected["auc"], "auc_ci": expected["auc_ci"]}
    assert drift["periods"][0]["auc"] > drift["periods"][2]["auc"]
    assert json.dumps(drift)  # plain JSON, as it crosses


def test_small_and_one_class_periods_are_suppressed_without_counts() -> None:
    labels, scores, patients, acquired = _test_set(np.random.default_rng(1), {2019: 3, 2020: 12, 2021: 9, 2022: 10})
    for pid in [p for p in acquired if p.startswith("2022")]:  # 2022: negatives only
        labels[[i for i, p in enumerate(patients) if p == pid]] = 0
    drift = period_metrics(labels, scores, patients, acquired, "year", k=5, n_boot=50)
    by_period = {p["period"]: p for p in drift["periods"]}
    assert by_period["2019"] == {"period": "2019", "suppressed": "fewer than 5 patients"}
    assert by_period["2022"] == {"period": "2022", "suppressed": "one class only"}
    assert by_period["2020"]["n_patients"] == 12 and by_period["2021"]["n_patients"] == 9


def test_one_suppressed_period_takes_the_smallest_other_with_it() -> None:
    labels, scores, patients, acquired = _test_set(np.random.default_rng(2), {2020: 4, 2021: 12, 2022: 8})
    drift = period_metrics(labels, scores, patients, acquired, "year", k=5, n_boot=50)
    by_period = {p["period"]: p for p in drift["periods"]}
    assert by_period["2020"]["suppressed"] == "fewer than 5 patients"
    assert by_period["2022"] == {"period": "2022", "suppressed": GIVES_BACK}
    assert by_period["2021"]["n_patients"] == 12


def test_quarters_and_patients_without_a_date_at_that_precision() -> None:
    labels, scores, patients, acquired = _test_set(np.random.default_rng(3), {2020: 12, 2021: 12})
    for pid in [p for p in acquired if p.startswith("2021")]:
        acquired[pid] = Acquired(2021)  # a bare year: no quarter
    drift = period_metrics(labels, scores, patients, acquired, "quarter", n_boot=50)
    assert [p["period"] for p in drift["periods"]] == ["2020-Q2"]
    assert drift["periods"][0]["n_patients"] == 12
    none = period_metrics(labels, scores, patients, {}, "year", n_boot=50)
    assert none == {"unit": "year", "periods": [], "reason": NO_DATES}


def test_only_labels_and_aggregates_cross_and_a_date_is_refused() -> None:
    labels, scores, patients, acquired = _test_set(np.random.default_rng(4), {2020: 3, 2021: 12, 2022: 12})
    drift = period_metrics(labels, scores, patients, acquired, "year", n_boot=50)
    content = encode_evaluation("site-a", _metrics(0.8), drift=drift)
    sent = str(content.config_records[SITE_KEY][DRIFT_KEY])
    assert "-05-" not in sent and not any(p in sent for p in patients)
    _, decoded = decode_evaluation(content)
    assert decoded[DRIFT_KEY] == drift
    assert DRIFT_KEY not in decode_evaluation(encode_evaluation("site-a", _metrics(0.8)))[1]
    bad = [
        {**drift, "periods": [{"period": "2021-05-01", "suppressed": "x"}]},  # a date as a label
        {**drift, "periods": [{"period": "2021", "suppressed": "x", "n_patients": 3}]},  # counts of a suppressed one
        {**drift, "periods": [{**drift["periods"][1], "patients": ["p1"]}]},  # a stray field
        {**drift, "periods": [{**drift["periods"][1], "auc": 1.5}]},
        {**drift, "unit": "month"},
        {**drift, "extra": 1},
    ]
    for entry in bad:
        with pytest.raises(ValueError, match="drift"):
            check_drift(entry)
