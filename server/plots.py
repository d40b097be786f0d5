"""Figures for the self-contained report: matplotlib (Agg) embedded as base64 PNG."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (the backend must be chosen first; re-exported)


def img(fig: Any) -> str:
    """Embed a figure as a base64 PNG so the report needs no other file and no network."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{data}">'
