"""Client-side clipping for differential privacy: Flower's own mods, applied when the run
asks for them.

Under `privacy.dp = "client-fixed"` / `"client-adaptive"` (fedir.config) a site clips its
model update itself, with Flower's `fixedclipping_mod` / `adaptiveclipping_mod`, before
it leaves the hospital; the coordinator then never sees an unclipped update. A ClientApp
is built once, before any run config exists, so fedir's ClientApp always carries this
one mod, which reads the run's settings and hands train messages to Flower's mod only in
those modes (Flower's mods refuse messages without a clipping norm, such as evaluation).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedir.config import Settings

_MODS: dict[str, Mod] = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def dp_clipping_mod(fixed: Settings | None = None) -> Mod:
    """A mod that applies Flower's clipping mod of the run's `privacy.dp` to train messages."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = fixed or Settings.from_run_config(context.run_config)
        flower_mod = _MODS.get(settings.privacy_dp)
        if flower_mod is None or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return flower_mod(msg, context, call_next)

    return mod
