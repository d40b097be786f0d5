"""The site's SuperNode, refusing every bundle that is not on the site's allow-list.

Where the gate sits, and why there (Flower 1.41, `flwr/supernode/start_client_internal.py`):
the SuperNode process pulls a message, and for a run it has not seen it fetches the run
and its FAB from the SuperLink (`get_fab`), then stores both in its NodeState. Only then
does it create the task that `flower-superexec` hands to a `flwr-clientapp` process, which
gets the FAB from that NodeState, unzips it under $FLWR_HOME/apps and imports the
bundle's ClientApp. The SuperNode process itself never imports bundle code. So the check
runs in the SuperNode process, on the FAB's bytes, right after `get_fab`: a bundle whose
sha256 is not approved is never stored, no task is created, no process is started, and
the SuperNode answers the message with an error reply (`INVALID_FAB`), exactly as Flower
does for its own `--trusted-entities` check (which serves only bundles signed by Flower's
hosted platform). The refused run stays unknown to the SuperNode, so each of its later
messages is refused the same way, and the next run is checked afresh.

Flower has no public hook at that point, so `run_supernode` wraps the module function
that holds it (`_pull_and_store_message`) in this process before starting Flower's own
`flower-supernode` entry point. A check inside the ClientApp would prove nothing: the
ClientApp is the bundle's code. Flower versions other than the one this wrapper was
written against are refused at start, since the wrapped function may have moved.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import flwr.supernode.start_client_internal as supernode_loop
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log
from flwr.supercore.fab import Fab
from flwr.supercore.version import package_version
from flwr.supernode.cli import flower_supernode

from fedir.client.approval import ApprovalError, fab_digest, fab_name, find_approval

FLOWER_VERSION = "1.41.0"  # the SuperNode loop below was read in this version
WRAPPED_PARAMETERS = ("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                      "pull_object", "confirm_message_received", "trusted_entities")


class AppNotApproved(Exception):
    """A bundle this site has not approved; str() is the reason the coordinator is sent."""


def check_bundle(fab: Fab, allow_list: Path, run_id: int) -> None:
    """Raise AppNotApproved unless the bundle's own bytes hash to an approved digest."""
    digest = fab_digest(fab.content)  # the bytes themselves, not the hash the SuperLink names
    try:
        approval = find_approval(digest, allow_list)
    except ApprovalError as exc:
        log(ERROR, "run %s refused: %s", run_id, exc)
        raise AppNotApproved(f"app sha256 {digest} refused: this site's allow-list cannot be read") from exc
    if approval is None:
        log(ERROR, "run %s refused: app %s sha256 %s is not in the allow-list %s",
            run_id, _name(fab), digest, allow_list)
        raise AppNotApproved(f"app sha256 {digest} is not approved at this site")
    log(INFO, "run %s: app %s sha256 %s approved %s%s", run_id, approval.app, digest,
        approval.approved_at, f" ({approval.note})" if approval.note else "")


def _name(fab: Fab) -> str:
    try:
        return fab_name(fab.content)
    except Exception:  # an unreadable bundle is refused all the same; its name is only for the log
        return "(unreadable bundle)"


def gated(pull_and_store: Callable[..., int | None], allow_list: Path) -> Callable[..., int | None]:
    """Flower's pull-and-store step with the bundle checked between `get_fab` and storing it."""

    def pull_and_store_approved(**kwargs: Any) -> int | None:
        received: list[Message] = []
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def remembering_receive() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Fab:
            fab = get_fab(fab_hash, run_id)
            check_bundle(fab, allow_list, run_id)
            return fab

        try:
            return pull_and_store(**{**kwargs, "receive": remembering_receive,
                                     "get_fab": checked_get_fab})
        except AppNotApproved as refusal:
            message = received[-1]
            reply = Message(Error(ErrorCode.INVALID_FAB, str(refusal)), reply_to=message)
            supernode_loop._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return message.metadata.run_id

    return pull_and_store_approved


def install_gate(allow_list: Path) -> None:
    """Wrap the SuperNode loop of this process; refuse a Flower whose loop may differ."""
    if package_version != FLOWER_VERSION:
        raise ApprovalError(f"the app gate was written for Flower {FLOWER_VERSION}, "
                            f"this environment has Flower {package_version}")
    step = supernode_loop._pull_and_store_message
    if tuple(inspect.signature(step).parameters) != WRAPPED_PARAMETERS:
        raise ApprovalError("Flower's SuperNode loop is not the one the app gate was written for")
    supernode_loop._pull_and_store_message = gated(step, Path(allow_list).resolve())


def run_supernode(allow_list: Path, flower_args: list[str]) -> None:
    """Flower's `flower-supernode FLOWER_ARGS...`, in this process, behind the gate."""
    install_gate(allow_list)
    log(INFO, "fedir app gate: only apps in %s run here", Path(allow_list).resolve())
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
