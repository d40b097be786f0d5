"""A small MedMNIST-shaped .npz for tests that need an imaging federation fast: the label
shows in the image (a bright centre square = positive), so a model can learn it in a few steps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

SIZE = 16


def toy_npz(path: Path, counts: Mapping[str, int]) -> Path:
    """Write `path` with `counts[split]` SIZE x SIZE uint8 images per split (train, val, test)
    and their (n, 1) labels, MedMNIST's layout; return the path."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in counts.items():
        labels = (rng.random(n) < 0.5).astype(np.uint8)
        images = rng.integers(0, 120, size=(n, SIZE, SIZE), dtype=np.uint8)
        images[labels == 1, 5:11, 5:11] += 100
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path
