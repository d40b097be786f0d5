"""Train/val/test assignment as a pure function of the patient identifier.

Splits are made by patient, never by image: every image, frame and series of a patient
lands in the same split. The assignment hashes the identifier, so it does not depend on
file order, on which other patients a site has, or on the run; the synthetic generator
and the site reader call the same function and therefore agree.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def patient_unit_interval(patient_id: str, salt: str = "fedir-split-v1") -> float:
    """Map a patient identifier to a number in [0, 1), uniformly and reproducibly."""
    digest = hashlib.sha256(f"{salt}\x00{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(
    patient_id: str, val_fraction: float = 0.15, test_fraction: float = 0.25
) -> Split:
    """Return the split of one patient.

    The test split takes the lowest `test_fraction` of the hash range and validation the
    next `val_fraction`: growing `val_fraction` only moves training patients into
    validation, and a test patient stays a test patient whatever `val_fraction` is.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be in [0, 1)"
        )
    u = patient_unit_interval(str(patient_id))
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
