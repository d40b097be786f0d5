"""Checkpoint after every round, and resume a run whose ServerApp was stopped.

A study at hospitals runs for hours or days; the coordinator's machine may reboot in the
middle. Flower's `Strategy.start` always counts rounds from 1 and keeps the global model
only in memory, so fedir keeps, in the run folder next to runs.sqlite, one checkpoint
file rewritten atomically at the end of every round: the run id, the last completed round,
the global arrays after it, the strategy's own state (the data attributes a Flower
strategy keeps between rounds, such as FedAdam's moments) and the ServerApp's own state.

A ServerApp started again on the same run folder finds the checkpoint of an unfinished
run with the same settings, drops whatever the store holds of the interrupted round (so
no round is recorded twice), and lets Flower's `start` run the remaining rounds with
their true round numbers (`ResumedRounds`), which the ClientApps use for their seeds: the
resumed run computes what the uninterrupted one would have.

The run store needs no copy of its own: every write to runs.sqlite is one committed
transaction, so after a crash it holds exactly the rounds that were written.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedir.errors import UserError

CHECKPOINT_NAME = "checkpoint.pkl"
_IGNORED_SETTINGS = ("output.dir",)  # the run folder may move between the two starts


@dataclass
class Checkpoint:
    """Everything a restarted ServerApp needs to continue after `completed_round`."""

    run_id: str
    settings: dict[str, Any]
    completed_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    app_state: dict[str, Any] = field(default_factory=dict)

    def array_record(self) -> ArrayRecord:
        return _to_record(self.arrays)

    def same_settings(self, settings: Mapping[str, Any]) -> bool:
        def relevant(cfg: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in cfg.items() if k not in _IGNORED_SETTINGS}

        return relevant(self.settings) == relevant(settings)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a reader (or a restart) sees the previous checkpoint or this one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(checkpoint, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in `path`, or None when there is none. The file is the server's own
    (written by save_checkpoint into its run folder), never data received from a site."""
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)  # noqa: S301 - our own file, see the docstring


def resume_point(path: Path, status_of: Callable[[str], str], settings: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint to continue from, or None to start a new run.

    A finished run's checkpoint is not resumed (the folder then gets a new run); an
    unfinished run with other settings is an error, since continuing it would mix two
    studies in one model.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint is None or status_of(checkpoint.run_id) == "finished":
        return None
    if not checkpoint.same_settings(settings):
        raise ResumeError(
            f"{path.parent} holds the unfinished run {checkpoint.run_id} (round "
            f"{checkpoint.completed_round} done) with other settings: run with the same "
            f"settings to resume it, or use another output folder"
        )
    return checkpoint


class ResumeError(UserError, RuntimeError):
    """A run folder cannot be resumed with these settings."""


# ---- strategy state -------------------------------------------------------------------


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


class _Arrays(dict):
    """Marks an ArrayRecord stored as numpy arrays inside the strategy state."""


def _plain(value: Any) -> tuple[bool, Any]:
    """(is data, its picklable form): numbers, text, arrays and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str, np.ndarray, np.generic)):
        return True, value
    if isinstance(value, ArrayRecord):
        return True, _Arrays(_to_numpy(value))
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if all(ok for ok, _ in items):
            return True, type(value)(v for _, v in items)
        return False, None
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        if all(ok for ok, _ in items.values()):
            return True, {k: v for k, (_, v) in items.items()}
    return False, None


def _unplain(value: Any) -> Any:
    if isinstance(value, _Arrays):
        return _to_record(value)
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unplain(v) for v in value)
    return value


def strategy_state(strategy: object) -> dict[str, Any]:
    """The strategy's public data attributes (FedAdam's m_t/v_t, FedAvg's settings...), not
    its callbacks nor the private working copies a round rebuilds: what a Flower strategy
    carries from one round to the next."""
    state = {}
    for name, value in vars(strategy).items():
        if name.startswith("_"):
            continue
        ok, plain = _plain(value)
        if ok:
            state[name] = plain
    return state


def restore_strategy_state(strategy: object, state: Mapping[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, _unplain(value))


# ---- the strategy mixin ---------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """Where this start of the ServerApp begins, and where it checkpoints."""

    path: Path
    run_id: str
    settings: dict[str, Any]
    first_round: int = 1


class ResumedRounds:
    """Strategy mixin: number the rounds from `plan.first_round` and checkpoint after each.

    Put it first in the bases (`class S(ResumedRounds, PerSiteFedAvg)`). Flower's
    `start` counts 1, 2, ...; every hook sees the true round number instead. After the
    round's evaluation is aggregated, the checkpoint is written with the arrays that were
    sent for that evaluation (the global model after the round) and `app_state()`.
    """

    def __init__(
        self, *, plan: RoundPlan, app_state: Callable[[], dict[str, Any]], **strategy_kwargs: Any
    ) -> None:
        super().__init__(**strategy_kwargs)
        self._plan = plan
        self._app_state = app_state
        self._latest: ArrayRecord | None = None

    def _true(self, server_round: int) -> int:
        return server_round + self._plan.first_round - 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(self._true(server_round), arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(self._true(server_round), replies)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._latest = arrays
        return super().configure_evaluate(self._true(server_round), arrays, config, grid)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(self._true(server_round), replies)  # type: ignore[misc]
        assert self._latest is not None, "configure_evaluate runs before aggregate_evaluate"
        save_checkpoint(self._plan.path, Checkpoint(
            run_id=self._plan.run_id,
            settings=self._plan.settings,
            completed_round=self._true(server_round),
            arrays=_to_numpy(self._latest),
            strategy_state=strategy_state(self),
            app_state=self._app_state(),
        ))
        return metrics
