"""A study that ends before its planned last round, normally.

Two rules end a study early: the privacy budget (fedir.strategies.privacy_budget: the next
round would spend more epsilon than `privacy.max-epsilon`) and early stopping
(fedir.strategies.selection: the validation criterion has not improved for `train.patience`
evaluated rounds). Either is raised from the ServerApp's round callbacks to leave Flower's
loop; the ServerApp keeps the rounds done, records the stop as a note of `kind` with the
message as its reason, saves the selected round's model and finishes the run (status
"finished": a study that stopped by its own rule has not failed).
"""

from __future__ import annotations


class StudyStopped(Exception):
    """The study stops after `server_round` (or before it: the privacy budget); `kind` is
    the note kind the run store records the reason under."""

    kind = "stopped"

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round
