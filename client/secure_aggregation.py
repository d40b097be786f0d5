"""Secure aggregation at the site: Flower's `secaggplus_mod` around fedir's train handler,
and the checks an update passes before it is masked (privacy.secure-aggregation = "secagg+").

Under SecAgg+ the coordinator never sees this site's update, only the sum of every site's
masked one, so it can no longer screen updates by their norm (fedir.strategies.validation):
what it would have refused is refused here, before anything is sent. An update with a NaN
or an infinity, an entry outside `privacy.secagg-clipping-range` (which Flower's quantiser
would silently clip) or a weight above `privacy.secagg-max-weight` (which would overflow
the masked sum) is not sent: the site logs why, and the message fails with that reason,
which the coordinator records; SecAgg+ then treats the site as dropped out of the round.

Flower's mod speaks the legacy FitIns/FitRes layout; fedir's train handler stays as it is:
`legacy_fit` hands it the instruction as a plain train message and turns its reply into a
FitRes (fedir.protocol, "secure aggregation"). A ClientApp is built before any run config
exists, so the mod is always there and acts only when the run asks for secure aggregation.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedir.config import Settings
from fedir.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    SECURE_NAMES_KEY,
    WEIGHT_KEY,
    decode_secure_instruction,
    encode_secure_training,
    is_secure_instruction,
)

log = logging.getLogger(__name__)


class UpdateRefused(ValueError):
    """This site's update breaks a bound of secure aggregation and is not sent."""


def update_problem(arrays: ArrayRecord, weight: float, clipping_range: float, max_weight: float) -> str | None:
    """Why the update cannot be summed under SecAgg+ as it is, or None.

    Args:
        arrays: the update, as the site would send it (fedir.protocol.encode_weights).
        weight: its weight in the sum (the site's labelled training patients).
        clipping_range: every entry must lie in [-clipping_range, clipping_range].
        max_weight: the largest weight the masked sum is sized for.
    """
    if weight > max_weight:
        return (f"its weight {weight:g} (labelled training patients) is above privacy.secagg-max-weight = "
                f"{max_weight:g}, which would overflow the masked sum")
    for name, array in arrays.items():
        values = array.numpy()
        finite = np.isfinite(values)
        if not finite.all():
            return f"{int(values.size - np.count_nonzero(finite))} non-finite value(s) in {name}"
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > clipping_range:
            return (f"{name} reaches {peak:.4g}, outside privacy.secagg-clipping-range = {clipping_range:g} "
                    "(SecAgg+ would clip it)")
    return None


def legacy_fit(msg: Message, context: Context, call_next: ClientAppCallable, settings: Settings) -> Message:
    """SecAgg+'s FitIns through fedir's train handler, answered as a FitRes; UpdateRefused
    when the update fails `update_problem`."""
    if not is_secure_instruction(msg.content):
        raise ValueError("a secure-aggregation round sent a train message without its FitIns")
    names = [str(n) for n in msg.content.config_records["fitins.config"][SECURE_NAMES_KEY]]
    msg.content = decode_secure_instruction(msg.content)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    weight = float(reply.content.metric_records[METRICS_KEY][WEIGHT_KEY])
    problem = update_problem(reply.content.array_records[ARRAYS_KEY], weight,
                             settings.privacy_secagg_clipping_range, settings.privacy_secagg_max_weight)
    if problem is not None:
        log.error("secure aggregation: this site's update is not sent: %s", problem)
        raise UpdateRefused(f"the site refused to send its update: {problem}")
    return Message(encode_secure_training(reply.content, names), reply_to=msg)


def secure_aggregation_mod(fixed: Settings | None = None) -> Mod:
    """A mod that runs train messages through Flower's `secaggplus_mod` (with `legacy_fit`
    inside it) when the run's `privacy.secure-aggregation` is on; every other message, and
    every message of a run without it, passes straight through."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = fixed or Settings.from_run_config(context.run_config)
        if not settings.secure_aggregation or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, lambda m, c: legacy_fit(m, c, call_next, settings))

    return mod
