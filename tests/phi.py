"""Planted PHI: identifying values written into a site's DICOM headers and manifest, which
tests then look for in everything that leaves the site (data card, client messages,
runs.sqlite, summary.json, report.html)."""

from __future__ import annotations

from pathlib import Path

import pydicom

PLANTED = {
    "PatientName": "ZZTOP^WILHELMINA",
    "PatientID": "MRN-7719-42",
    "PatientBirthDate": "19450317",
    "StudyDate": "20240229",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.771942",
    "InstitutionName": "St Elsewhere Heart Center",
    "AccessionNumber": "ACC99887766",
}


def plant(path: Path, patient_id: str = PLANTED["PatientID"]) -> None:
    """Overwrite the identifying tags of one DICOM file with the planted values."""
    ds = pydicom.dcmread(path)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.save_as(path)


def needles(patient_ids: list[str] = ()) -> list[str]:
    """Every planted value as it could appear in text, plus the given patient ids.

    A date is also looked for as 1945-03-17, and a name's parts on their own."""
    values = set(PLANTED.values()) | set(patient_ids)
    for key in ("PatientBirthDate", "StudyDate"):
        d = PLANTED[key]
        values.add(f"{d[:4]}-{d[4:6]}-{d[6:]}")
    values.update(PLANTED["PatientName"].split("^"))
    return sorted(values)


def planted_numbers() -> set[float]:
    """Planted values that are numbers (dates as YYYYMMDD, the accession's digits)."""
    return {float(PLANTED["PatientBirthDate"]), float(PLANTED["StudyDate"]),
            float(PLANTED["AccessionNumber"][3:])}
