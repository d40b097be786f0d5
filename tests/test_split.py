"""fedir.client.split: the train/val/test assignment is a pure function of the patient."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedir.client.manifest import read_manifest, write_manifest
from fedir.client.split import split_of

IDS = [f"patient-{i:05d}" for i in range(5000)]


def test_no_patient_in_two_splits_and_stable_across_calls() -> None:
    first = {p: split_of(p, 0.15, 0.25) for p in IDS}
    assert {p: split_of(p, 0.15, 0.25) for p in reversed(IDS)} == first


def test_fractions_roughly_respected() -> None:
    splits = [split_of(p, 0.15, 0.25) for p in IDS]
    assert splits.count("test") / len(IDS) == pytest.approx(0.25, abs=0.03)
    assert splits.count("val") / len(IDS) == pytest.approx(0.15, abs=0.03)
    assert splits.count("train") / len(IDS) == pytest.approx(0.60, abs=0.03)


def test_independent_of_manifest_row_order(tmp_path: Path) -> None:
    rows = [{"patient_id": f"P{i // 3}", "path": f"img{i}.dcm", "label": i % 2} for i in range(300)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assignments = []
    for name, ordered in (("a", rows), ("b", shuffled)):
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, ordered)
        assignments.append({r.path.name: split_of(r.patient_id) for r in read_manifest(tmp_path / name)})
    assert assignments[0] == assignments[1]
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(assignments[0][row["path"]])
    assert all(len(s) == 1 for s in by_patient.values())  # all images of a patient together


def test_growing_val_fraction_only_moves_train_patients_to_val() -> None:
    for p in IDS[:1000]:
        before, after = split_of(p, 0.15, 0.25), split_of(p, 0.20, 0.25)
        assert before == after or (before, after) == ("train", "val")


def test_invalid_fractions_rejected() -> None:
    with pytest.raises(ValueError):
        split_of("P1", 0.5, 0.5)
