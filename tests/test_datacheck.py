"""`fedir data check` and the data card: the local report, the exit status, k-suppression
and that no planted identifier reaches a card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedir.cli import main
from fedir.client.datacard import ImageOutcome, build_card, suppress
from fedir.client.datacheck import check_site
from fedir.client.manifest import ManifestRow, write_manifest
from tests.dicom_factory import write_dicom
from tests.phi import needles, plant
from tests.shared_data import XA_CINE, shared_data

SCANNERS = (("Acme", 7), ("Zenith", 2))  # (manufacturer, patients): Zenith is below k=5


def _site(root: Path) -> Path:
    rows = []
    index = 0
    for manufacturer, patients in SCANNERS:
        for _ in range(patients):
            path = write_dicom(root / f"img/{index}.dcm", np.full((2, 8, 8), index + 1))
            plant(path, patient_id=f"MRN-{index:04d}")
            ds = pydicom.dcmread(path)
            ds.Manufacturer = manufacturer
            ds.ImagerPixelSpacing = [0.2, 0.2]
            ds.save_as(path)
            rows.append({"patient_id": f"MRN-{index:04d}", "path": f"img/{index}.dcm",
                         "label": None if index == 0 else index % 2})
            index += 1
    (root / "img/bad.dcm").write_bytes(b"not dicom at all" * 20)
    rows.append({"patient_id": "MRN-9999", "path": "img/bad.dcm", "label": 1})
    write_manifest(root, rows)
    return root


def test_check_prints_counts_and_skips_and_writes_a_suppressed_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _site(tmp_path / "site")
    card_path = tmp_path / "card.json"
    assert main(["data", "check", str(root), "--card", str(card_path)]) == 0
    out = capsys.readouterr().out
    assert "10 images listed, 9 loaded, 1 skipped" in out
    assert "skipped, not a DICOM file: 1" in out and "img/bad.dcm" in out
    assert "patients: 9 (8 labelled, 1 unlabelled)" in out
    assert "labelled patients per class: 0: 4, 1: 4" in out
    text = card_path.read_text()
    card = json.loads(text)
    assert card["files"] == {"listed": 10, "loaded": 9, "skipped": {"not a DICOM file": 1}}
    # Zenith (2 patients) is suppressed, and so is Acme, since the total (9) would give it back.
    assert card["acquisition"]["Manufacturer"] == {"values": {}, "suppressed_cells": 2}
    assert card["acquisition"]["Modality"] == {"values": {"XA": 9}, "suppressed_cells": 0}
    assert card["acquisition"]["pixel spacing"]["values"] == {"0.15-0.3 mm": 9}
    assert card["acquisition"]["frames per file"]["values"] == {"2-9": 9}
    assert card["labels"]["per_class"] == {"values": {}, "suppressed_cells": 2}
    assert card["labels"]["prevalence"] is None
    for needle in needles([f"MRN-{i:04d}" for i in range(10)] + ["MRN-9999"]):
        assert needle not in text, needle


def test_check_exit_status_when_nothing_is_usable(tmp_path: Path, capsys) -> None:
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.dcm").touch()
    write_manifest(root, [{"patient_id": "P1", "path": "a.dcm", "label": 0}])
    assert main(["data", "check", str(root)]) == 1
    assert "no usable image" in capsys.readouterr().out


def test_check_exit_status_when_the_manifest_is_invalid(tmp_path: Path, capsys) -> None:
    (tmp_path / "manifest.csv").write_text("patient_id,path,label\nP1,a.dcm,3\n")
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the task's classes" in err[0]


def test_suppression_hides_small_cells_and_their_complement() -> None:
    assert suppress({"a": 9, "b": 5}, 5) == {"values": {"a": 9, "b": 5}, "suppressed_cells": 0}
    assert suppress({"a": 9, "b": 6, "c": 1}, 5) == {"values": {"a": 9}, "suppressed_cells": 2}
    assert suppress({"a": 9, "b": 6, "c": 1, "d": 2}, 5) == {"values": {"a": 9, "b": 6},
                                                            "suppressed_cells": 2}
    assert suppress({"a": 3}, 5) == {"values": {}, "suppressed_cells": 1}


def test_a_header_the_card_cannot_read_counts_as_unknown(tmp_path: Path) -> None:
    """The card reads headers apart from decoding; a failure there must not fail a round."""
    row = ManifestRow(row=2, patient_id="P1", path=tmp_path / "gone.dcm", label=1)
    outcome = ImageOutcome.of(row, None)
    assert outcome.acquisition["Modality"] == "none (unreadable header)"
    assert outcome.acquisition["frames per file"] == "unknown"


def test_card_of_the_real_xa_cine(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    shutil.copyfile(shared_data() / XA_CINE, root / "cine.dcm")
    write_manifest(root, [{"patient_id": "P1", "path": "cine.dcm", "label": 1}])
    card = build_card(check_site(root, progress=False).outcomes, val_fraction=0.15,
                      test_fraction=0.25, k=1)
    acquisition = {name: table["values"] for name, table in card["acquisition"].items()}
    assert acquisition["Modality"] == {"XA": 1} and acquisition["BitsStored"] == {"8": 1}
    assert acquisition["frames per file"] == {"50-99": 1}
