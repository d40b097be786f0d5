"""Checkpoint after every round, and resume a run whose ServerApp was stopped.

A study at hospitals runs for hours or days; the coordinator's machine may reboot in the
middle. Flower's `Strategy.start` always counts rounds from 1 and keeps the global model
only in memory, so fedir keeps, in the run folder next to runs.sqlite, one checkpoint
file rewritten atomically at the end of every round: the run id, the last completed round,
the global arrays after it, the strategy's own state (the data attributes a Flower
strategy keeps between rounds, such as FedAdam's moments), the ServerApp's own state (among
it the model selection, fedir.strategies.selection: the selected round, its score, its
global arrays, per-site metrics and embedding moments) and the server's random generators
(Flower's node sampling draws from `random`, its DP noise from `numpy.random`). The file
is an `.npz` with a JSON document (fedir.statefile), never a pickle: loading a tampered
checkpoint must not run code on the coordinator.

A ServerApp started again on the same run folder finds the checkpoint of an unfinished
run with the same settings, drops whatever the store holds of the interrupted round (so
no round is recorded twice), and lets Flower's `start` run the remaining rounds with
their true round numbers (`ResumedRounds`), which the ClientApps use for their seeds: the
resumed run computes what the uninterrupted one would have. Each site keeps its own
state between rounds on its own disk (fedir.client.site_state), keyed by the run id the
rounds carry.

The run store needs no copy of its own: every write to runs.sqlite is one committed
transaction, so after a crash it holds exactly the rounds that were written.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedir.errors import UserError
from fedir.protocol import RUN_ID_KEY, site_name
from fedir.statefile import StateFileError, encodable, read_state, write_state

CHECKPOINT_NAME = "checkpoint.npz"
LEGACY_CHECKPOINT_NAME = "checkpoint.pkl"  # what older fedir wrote: a pickle, never loaded
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
    generators: dict[str, Any] | None = None  # server_generators(); None: seed afresh

    def array_record(self) -> ArrayRecord:
        return _to_record(self.arrays)

    def same_settings(self, settings: Mapping[str, Any]) -> bool:
        def relevant(cfg: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in cfg.items() if k not in _IGNORED_SETTINGS}

        return relevant(self.settings) == relevant(settings)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a reader (or a restart) sees the previous checkpoint or this one."""
    write_state(path, asdict(checkpoint))


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in `path`, or None when there is none; ResumeError when the file
    is not a checkpoint (damaged or tampered with): nothing in it is executed."""
    if not path.is_file():
        return None
    try:
        fields = read_state(path)
        return Checkpoint(**fields)
    except (StateFileError, TypeError) as exc:
        raise ResumeError(
            f"{path} is not a readable fedir checkpoint ({exc}): restore it from a backup, "
            f"or delete it to start a new run in {path.parent}"
        ) from None


def resume_point(path: Path, status_of: Callable[[str], str], settings: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint to continue from, or None to start a new run.

    A finished run's checkpoint is not resumed (the folder then gets a new run); an
    unfinished run with other settings is an error, since continuing it would mix two
    studies in one model. So is a legacy pickle checkpoint, which is never loaded.
    """
    legacy = path.with_name(LEGACY_CHECKPOINT_NAME)
    if legacy.is_file():
        raise ResumeError(
            f"{legacy} is a checkpoint of an older fedir (a pickle, which fedir no longer "
            f"loads): delete it to start a new run, or use another output folder"
        )
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
    """A run folder cannot be resumed (other settings, or an unreadable checkpoint)."""


# ---- strategy state and the server's generators ---------------------------------------


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def strategy_state(strategy: object) -> dict[str, Any]:
    """The strategy's public data attributes (FedAdam's m_t/v_t, FedAvg's settings, an
    adaptive DP clipping norm, the arrays a DP wrapper keeps...), not its callbacks nor the
    private working copies a round rebuilds: what a Flower strategy carries from one round
    to the next. An ArrayRecord is copied from numpy: one that arrived over the wire holds
    memoryviews, which the checkpoint's dataclass copy cannot deep-copy."""
    return {name: _to_record(_to_numpy(value)) if isinstance(value, ArrayRecord) else value
            for name, value in vars(strategy).items() if not name.startswith("_") and encodable(value)}


def restore_strategy_state(strategy: object, state: Mapping[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, value)


def server_generators() -> dict[str, Any]:
    """The states of the generators Flower draws from in the ServerApp's process:
    `random` (node sampling, strategy_utils.sample_nodes) and `numpy.random` (DP noise)."""
    return {"random": random.getstate(), "numpy": np.random.get_state()}


def set_server_generators(seed: int, state: Mapping[str, Any] | None) -> None:
    """Seed both generators for a new run, or put back a checkpoint's states."""
    if state is None:
        random.seed(seed)
        np.random.seed(seed)
        return
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])


# ---- the strategy mixin ---------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """Where this start of the ServerApp begins, and where it checkpoints.

    `generators` are a checkpoint's server_generators() when resuming; a new run
    (None) seeds them from `seed` (train.seed), so that two runs sample the same nodes.
    """

    path: Path
    run_id: str
    settings: dict[str, Any]
    first_round: int = 1
    seed: int = 0
    generators: dict[str, Any] | None = None


def in_site_order(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by site name (error replies last, by node id).

    Replies arrive in the order the sites finish, and a floating-point average depends on
    the order it adds in: sorted, a round computes the same average in every run.
    """
    def key(msg: Message) -> tuple[int, str, int]:
        name = None if msg.has_error() else site_name(msg.content)
        return (1, "", msg.metadata.src_node_id) if name is None else (0, name, msg.metadata.src_node_id)

    return sorted(replies, key=key)


class ResumedRounds:
    """Strategy mixin: number the rounds from `plan.first_round` and checkpoint after each.

    Put it first in the bases (`class S(ResumedRounds, PerSiteFedAvg)`). Flower's
    `start` counts 1, 2, ...; every hook sees the true round number instead, and every
    round's config carries the run id (`run-id`), under which each site keeps its own
    state. Replies are handed on in site order (`in_site_order`). After the round's
    evaluation is aggregated, the checkpoint is written with the arrays that were sent
    for that evaluation (the global model after the round), `app_state()` and the
    server's generators.
    """

    def __init__(
        self, *, plan: RoundPlan, app_state: Callable[[], dict[str, Any]], **strategy_kwargs: Any
    ) -> None:
        super().__init__(**strategy_kwargs)
        self._plan = plan
        self._app_state = app_state
        self._latest: ArrayRecord | None = None
        set_server_generators(plan.seed, plan.generators)

    def _true(self, server_round: int) -> int:
        return server_round + self._plan.first_round - 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[RUN_ID_KEY] = self._plan.run_id
        return super().configure_train(self._true(server_round), arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(self._true(server_round), in_site_order(replies))  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._latest = arrays
        config[RUN_ID_KEY] = self._plan.run_id
        return super().configure_evaluate(self._true(server_round), arrays, config, grid)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(self._true(server_round), in_site_order(replies))  # type: ignore[misc]
        assert self._latest is not None, "configure_evaluate runs before aggregate_evaluate"
        save_checkpoint(self._plan.path, Checkpoint(
            run_id=self._plan.run_id,
            settings=self._plan.settings,
            completed_round=self._true(server_round),
            arrays=_to_numpy(self._latest),
            strategy_state=strategy_state(self),
            app_state=self._app_state(),
            generators=server_generators(),
        ))
        return metrics
