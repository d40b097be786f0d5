"""Screen the sites' model updates before aggregation, so one faulty or hostile site
cannot poison the global model.

A weighted average is only as good as its worst input: one NaN makes every weight NaN,
one array of the wrong shape aborts Flower's aggregation, and one update scaled up a
thousand times drags the average wherever it points. So each round, before FedAvg (or
any Flower strategy) averages anything, every site's ArrayRecord is checked: the array
names, shapes and dtypes of the model's own state dict (the template), only finite values,
and a distance from the global model it was sent (the update's L2 norm) not far above the
norms the other sites sent that round. The template, not the global model last sent, is
the yardstick for dtypes: Flower's averaging turns integer buffers (BatchNorm's
`num_batches_tracked`) into float64, while a site's model hands them back as int64.
Rejected updates are left out of the average and reported with their reason; the round
goes on with the rest when enough remain.

The norm test compares each site with the median of the *other* sites' norms (leave one
out), so it works from two sites up and a single huge update cannot raise the yardstick
it is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedir.protocol import ARRAYS_KEY, site_name

RejectCallback = Callable[[int, str, str], None]  # (server round, site, reason)


def structural_problem(update: ArrayRecord, template: ArrayRecord) -> str | None:
    """Why `update` does not fit the model `template` (names, shapes, dtypes, NaN/inf), or None."""
    missing = sorted(set(template) - set(update))
    extra = sorted(set(update) - set(template))
    if missing or extra:
        return f"wrong array names: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in template.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"wrong shape for {name}: {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if arr.dtype != ref.dtype:
            return f"wrong dtype for {name}: {arr.dtype}, expected {ref.dtype}"
    for name, arr in update.items():
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            return f"non-finite values: {bad} in {name}"
    return None


def update_norm(update: ArrayRecord, sent: ArrayRecord, template: ArrayRecord) -> float:
    """L2 distance between an update and the global model `sent`, over the arrays that are
    floating point in the model `template` (weights, not counters)."""
    total = 0.0
    for name, ref in template.items():
        if np.issubdtype(np.dtype(ref.dtype), np.inexact):
            diff = update[name].numpy().astype(np.float64) - sent[name].numpy().astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


K = TypeVar("K", bound=Hashable)  # whatever identifies an update: a node id, a site name


def screen_updates(
    updates: Mapping[K, ArrayRecord], sent: ArrayRecord, template: ArrayRecord,
    max_norm_ratio: float,
) -> dict[K, str]:
    """`{key: reason}` for every update (keyed by site or node) to leave out of this round's average."""
    rejected = {
        site: why
        for site, update in updates.items()
        if (why := structural_problem(update, template)) is not None
    }
    norms = {
        site: update_norm(update, sent, template)
        for site, update in updates.items() if site not in rejected
    }
    for site, norm in norms.items():
        # Sites that did not move the model (no labelled data, or the idle nodes of the
        # pooled arm) say nothing about how large an honest update is.
        others = [n for s, n in norms.items() if s != site and n > 0]
        if not others:
            continue
        yardstick = float(np.median(others))
        if norm > max_norm_ratio * max(yardstick, 1e-12):
            rejected[site] = (
                f"update norm {norm:.4g} is {norm / max(yardstick, 1e-12):.3g}x the median "
                f"of the other sites ({yardstick:.4g}); the limit is {max_norm_ratio:g}x"
            )
    return rejected


def site_of(msg: Message) -> str:
    """The site name a reply carries (fedir.protocol), else its node id."""
    return site_name(msg.content) or f"node {msg.metadata.src_node_id}"


class ValidatedUpdates:
    """Strategy mixin: drop the training replies whose update fails `screen_updates`.

    Put it before a Flower strategy in the bases (`class S(ValidatedUpdates, FedAvg)`)
    and give it the model's state dict as `template`: it remembers the global arrays
    `configure_train` sends, filters the replies in
    `aggregate_train`, reports each rejection to `on_reject`, and hands the rest to the
    strategy. With fewer than `min_accepted` updates left it aggregates nothing, so the
    global model stays as it was for that round.
    """

    def __init__(
        self,
        *,
        on_reject: RejectCallback,
        template: ArrayRecord,
        max_norm_ratio: float = 10.0,
        min_accepted: int = 1,
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__(**strategy_kwargs)
        self.on_reject = on_reject
        self._template = template
        self.max_norm_ratio = max_norm_ratio
        self.min_accepted = min_accepted
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # Keyed by node id, which Flower sets, not by the site name a reply claims: two
        # replies claiming one name must still be checked one by one.
        answered = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        updates: dict[int, ArrayRecord] = {}
        reasons: dict[int, str] = {}
        for node, msg in answered.items():
            records = msg.content.array_records
            if list(records) != [ARRAYS_KEY]:
                reasons[node] = f"expected one ArrayRecord {ARRAYS_KEY!r}, got {sorted(records)}"
            else:
                updates[node] = records[ARRAYS_KEY]
        assert self._sent is not None, "configure_train runs before aggregate_train"
        reasons.update(screen_updates(updates, self._sent, self._template, self.max_norm_ratio))
        for node, reason in reasons.items():
            self.on_reject(server_round, site_of(answered[node]), reason)
        kept = [m for m in replies if m.has_error() or m.metadata.src_node_id not in reasons]
        accepted = sum(1 for m in kept if not m.has_error())
        if accepted < self.min_accepted:
            self.on_reject(
                server_round, "global",
                f"only {accepted} acceptable update(s), {self.min_accepted} needed: "
                "the global model is kept unchanged this round",
            )
            return None, None
        return super().aggregate_train(server_round, kept)  # type: ignore[misc]
