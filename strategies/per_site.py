"""Per-site capture for any Flower strategy: every site's reply reaches the server before aggregation.

Flower's strategies keep the weighted average of the sites' MetricRecords and drop the
rest; fedir needs each site's own aggregates (per-site metrics, histograms, label counts)
for the per-site table and the bias analysis. So `aggregate_train` and
`aggregate_evaluate` decode each reply (fedir.records) and pass them, keyed by site name,
to callbacks the ServerApp provides, then let the strategy (FedAvg, FedAdam, Krum...) do
exactly what it always does. The capture is a mixin placed before Flower's class in the
MRO (`with_per_site_capture(FedAdam)`), so there is one implementation for all of them.
Replies that carry an error (a site whose ClientApp failed) are passed on as missing,
with Flower's error reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedir.records import decode_evaluation, decode_training
from fedir.strategies.validation import ValidatedUpdates
from fedir.wire import from_wire


@dataclass
class RoundReplies:
    """One round's replies: decoded aggregates per site, and the sites that failed."""

    server_round: int
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # node id -> error reason
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)  # site -> its update (training)


Callback = Callable[[RoundReplies], None]


def _collect(
    server_round: int, replies: list[Message], decode: Callable[..., tuple[str, dict]], arrays_key: str = ""
) -> RoundReplies:
    out = RoundReplies(server_round)
    for msg in replies:
        if msg.has_error():
            out.failed[f"node {msg.metadata.src_node_id}"] = msg.error.reason
            continue
        site, values = decode(msg.content)
        out.per_site[site] = values
        if arrays_key and arrays_key in msg.content.array_records:
            out.arrays[site] = msg.content.array_records[arrays_key]
    return out


class PerSiteCapture:
    """Mixin: report each site's decoded replies to `on_train` / `on_evaluate`, then defer
    to the next class in the MRO (a Flower strategy) for the aggregation itself."""

    def __init__(self, *, on_train: Callback, on_evaluate: Callback, **strategy_kwargs: Any) -> None:
        super().__init__(**strategy_kwargs)
        self.on_train = on_train
        self.on_evaluate = on_evaluate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key = self.arrayrecord_key  # type: ignore[attr-defined]
        for msg in replies:  # float16 uploads are averaged in float32 (fedir.wire)
            if not msg.has_error() and key in msg.content.array_records:
                msg.content[key] = from_wire(msg.content.array_records[key])
        self.on_train(_collect(server_round, replies, decode_training, key))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.on_evaluate(_collect(server_round, replies, decode_evaluation))
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


def with_per_site_capture(strategy_class: type[Strategy], *outer: type) -> type[Strategy]:
    """`FedAdam` -> `PerSiteFedAdam`: Flower's class with the capture and the update
    validation (fedir.strategies.validation) mixed in, in that order: every reply is
    reported and float16 uploads are widened first, then only the updates that pass
    validation reach Flower's aggregation. `outer` mixins go first (the server's
    round numbering and checkpoints, fedir.server.checkpoint.ResumedRounds)."""
    bases = (*outer, PerSiteCapture, ValidatedUpdates, strategy_class)
    return type(f"PerSite{strategy_class.__name__}", bases, {})

