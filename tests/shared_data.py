"""Where the shared public test data lives: `../shared/data` beside the repository, or
`$FEDIR_DATA`. Tests read it in place; nothing is copied into the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared data folder; a missing one is an error (CI lays it beside the checkout)."""
    root = Path(os.environ.get("FEDIR_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        raise FileNotFoundError(f"shared data not found at {root}: set FEDIR_DATA")
    return root


XA_CINE = "dicom_xa/XA_coronary_96frames_HasFragmentSequence.dcm"
