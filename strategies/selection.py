"""Model selection and early stopping on the validation patients, never on the test ones.

Each site scores the round's global model on its validation patients as well as its test
patients and sends both sets of aggregates (fedir.protocol VAL_KEY); the server pools
them (fedir.metrics.pooled_metrics). `eval.select` names, before the study starts, which
round's model is the study's result:

- "val-auc": the round with the highest pooled validation AUC, the earliest on ties (a
  later round must be strictly better). The AUC is the per-patient one (one row per
  patient, mean score over the patient's images) when the first round with validation
  metrics has per-patient metrics, else the per-image one; the unit is then kept for the
  whole study, so that no two rounds are compared in different units. Until some round has
  a pooled validation AUC (a federation whose validation patients are all of one class, or
  `data.val-fraction` = 0), the last evaluated round is kept, and the criterion says so.
- "last": the last evaluated round (its validation AUC is reported, not used).

`train.patience` = N > 0 stops the study once N evaluated rounds have passed without a
better validation AUC than the selected round's (EarlyStopped); before any round has a
validation AUC there is nothing to improve on, and nothing stops.

The test metrics are not an input here: `Selection.offer` takes the pooled validation
entry only. The ServerApp (fedir.server.server_app) keeps the selected round's global
model, and summary.json replays the same `Selection` over the run store's validation rows
(fedir.server.summary), so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedir.strategies.stopping import StudyStopped

LAST = "last"
VAL_AUC = "val-auc"
PER_PATIENT = "patient"
PER_IMAGE = "image"


class EarlyStopped(StudyStopped):
    """The validation AUC has not improved for `train.patience` evaluated rounds."""

    kind = "early_stop"


@dataclass
class Selection:
    """The round chosen so far by `criterion` (an `eval.select` value), fed one evaluated
    round at a time (`offer`); `state()` / `Selection(**state)` carry it over a restart."""

    criterion: str
    patience: int = 0
    metric: str = "auc"  # the task kind's SELECTION_METRIC (fedir.tasks): auc, survival's c_index, dice
    round: int | None = None  # the selected round
    score: float | None = None  # its pooled validation AUC in `unit` (None: not computed)
    scored: bool = False  # chosen by a validation AUC (else: the last evaluated round)
    unit: str | None = None  # PER_PATIENT or PER_IMAGE, fixed by the first round with validation metrics
    unit_reason: str = ""  # why per image: the pooled per-patient reason
    unscored_reason: str = "no site reported validation metrics"  # why no round has a score yet
    since_best: int = 0  # evaluated rounds after the selected one without a better score
    last_round: int | None = None  # the last round offered

    def offer(self, server_round: int, pooled_val: dict | None) -> bool:
        """Take one evaluated round's pooled validation entry (None when no site sent one);
        True when this round becomes the selected one."""
        self.last_round = server_round
        if pooled_val is not None and self.unit is None and "per_patient" not in pooled_val:
            self.unit = PER_PATIENT  # a task whose rows are patients (survival): no per-image level
        if pooled_val is not None and self.unit is None:
            per_patient = pooled_val.get("per_patient")
            self.unit = PER_PATIENT if per_patient else PER_IMAGE
            if not per_patient:
                self.unit_reason = str((pooled_val.get("reasons") or {}).get("per_patient", "not reported"))
        score = self._score(pooled_val)
        if self.criterion == LAST:
            self._select(server_round, score, scored=False)
            return True
        if score is not None and (not self.scored or self.score is None or score > self.score):
            self._select(server_round, score, scored=True)
            return True
        if not self.scored:  # nothing to compare yet: keep the latest round, say why
            self.unscored_reason = self._missing(pooled_val)
            self._select(server_round, score, scored=False)
            return True
        self.since_best += 1
        return False

    def _select(self, server_round: int, score: float | None, *, scored: bool) -> None:
        self.round, self.score, self.scored, self.since_best = server_round, score, scored, 0

    def _score(self, pooled_val: dict | None) -> float | None:
        if pooled_val is None:
            return None
        entry = self._entry(pooled_val)
        return None if not entry or entry.get(self.metric) is None else float(entry[self.metric])

    def _entry(self, pooled_val: dict) -> dict | None:
        """The pooled validation entry at the unit: per patient (nested, or the entry itself
        when the task has no per-image level), or per image."""
        if self.unit == PER_PATIENT and "per_patient" in pooled_val:
            return pooled_val.get("per_patient")
        return pooled_val

    def _missing(self, pooled_val: dict | None) -> str:
        if pooled_val is None:
            return "no site reported validation metrics"
        entry = self._entry(pooled_val) or {}
        return str((entry.get("reasons") or {}).get(self.metric, f"the pooled validation {self.metric} was not computed"))

    def stop(self) -> EarlyStopped | None:
        """The early stop now due (`patience` evaluated rounds without improvement), or None."""
        if not self.patience or not self.scored or self.since_best < self.patience or self.last_round is None:
            return None
        return EarlyStopped(self.last_round, (
            f"stopped early after round {self.last_round}: the pooled validation {self.label} has not improved for "
            f"{self.since_best} evaluated round(s) (train.patience = {self.patience}); the best was round "
            f"{self.round}'s, {self.score:.4f}"))

    def describe(self) -> str:
        """The criterion as summary.json and the report state it."""
        if self.criterion == LAST:
            return (f'last: the last evaluated round (eval.select = "last"); its validation {self.label} is shown, '
                    "not used to choose")
        if not self.scored:
            return (f"val-auc: no evaluated round had a pooled validation {self.label} ({self.unscored_reason}), "
                    "so the last evaluated round is kept")
        unit = ("per patient (mean score over a patient's images)" if self.unit == PER_PATIENT
                else f"per image (no per-patient validation metrics: {self.unit_reason})")
        return f"val-auc: the highest pooled validation {self.label}, {unit}; the earliest round on ties"

    @property
    def label(self) -> str:
        """How the criterion names its metric: AUC, a survival study's C-index, a segmentation's Dice."""
        return {"auc": "AUC", "c_index": "C-index", "dice": "Dice"}.get(self.metric, self.metric)

    def state(self) -> dict[str, Any]:
        return asdict(self)
