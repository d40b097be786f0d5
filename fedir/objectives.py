"""Local training objectives: what a site minimises each step.

An objective receives a labelled batch and, when it asks for one, a batch of unlabelled
images of the same site, and returns a scalar loss. The training loop (fedir.task.train)
is the same for all of them, so a semi-supervised objective is a new class here and a
name in OBJECTIVES, nothing else.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Objective(Protocol):
    """The interface of a local objective."""

    name: ClassVar[str]
    uses_unlabelled: ClassVar[bool]

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, 1, S, S) labelled images, y: (B,) class indices, x_unlabelled: (B', 1, S, S) or None."""
        ...


class Supervised:
    """Cross-entropy on the labelled images only; unlabelled images are not used."""

    name: ClassVar[str] = "supervised"
    uses_unlabelled: ClassVar[bool] = False

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None
    ) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


OBJECTIVES: dict[str, type[Objective]] = {"supervised": Supervised}


def build_objective(name: str) -> Objective:
    """The objective named in the scenario's `[train] objective`."""
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}"
        ) from None
