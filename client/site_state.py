"""A site's own state between rounds, kept on the site's disk so that a resumed run continues it.

What a site carries from one round to the next lives in the node's `context.state`: its
FedBN normalisation layers and withheld entries (fedir.client.kept_state), the local
arm's weights (fedir.client.arms), whether its data card was sent. Flower keeps
`context.state` for one Flower run only, and a coordinator that restarts a study starts a
new Flower run (fedir.server.checkpoint): the sites would then start from nothing, and
the resumed study would compute something else than the uninterrupted one. The state may
not go to the server either (it is what the site keeps to itself). So after every
training round the site writes its state to its own cache folder, keyed by the study's
run id (which every round's config carries) and the round; when a round of that run
arrives at a node whose `context.state` has not seen the run, the state saved after the
latest earlier round is put back. An unwritable cache folder only costs exactness: a
warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord

from fedir.client.site import CACHE_DIR_NAME
from fedir.protocol import decode_round_config
from fedir.statefile import StateFileError, read_state, write_state

log = logging.getLogger(__name__)

_MARK = "fedir-site-state"  # context.state: the run whose state this node holds
_KEPT_FILES = 2  # the last round's state and the one before: a round may be redone once


def _folder(site_dir: Path, run_id: str, cache_dir: Path | None = None) -> Path:
    """The run's state folder: under node config `cache-dir` when the site folder is
    read-only, else under the site folder's own cache."""
    # the run id comes from the coordinator: hashed, it can never name another folder
    root = cache_dir if cache_dir is not None else site_dir / CACHE_DIR_NAME
    return root / "state" / hashlib.sha256(run_id.encode()).hexdigest()[:16]


def _file(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round:06d}.npz"


def _round_of(path: Path) -> int:
    return int(path.stem.removeprefix("round-"))


def restore(context: Context, site_dir: Path, config: ConfigRecord, *, before_training: bool,
            cache_dir: Path | None = None) -> None:
    """Put back this site's state for the run in `config`, if this node has not seen the run.

    A training message of round r starts from the state saved after an earlier round, an
    evaluation of round r from the state after its training.
    """
    sent = decode_round_config(config)
    run_id, server_round = sent.run_id, sent.server_round
    if run_id is None:
        return
    mark = context.state.config_records.get(_MARK)
    if mark is not None and mark["run-id"] == run_id:
        return
    newest = server_round - 1 if before_training else server_round
    folder = _folder(site_dir, run_id, cache_dir)
    saved = sorted((p for p in folder.glob("round-*.npz") if _round_of(p) <= newest), key=_round_of)
    if saved:
        try:
            state = read_state(saved[-1])
        except StateFileError as exc:
            log.warning("the site's saved state is unreadable, starting afresh: %s", exc)
        else:
            for name, record in state["arrays"].items():
                context.state[name] = record
            for name, values in state["configs"].items():
                context.state[name] = ConfigRecord(values)
            for name, values in state["metrics"].items():
                context.state[name] = MetricRecord(values)
    context.state[_MARK] = ConfigRecord({"run-id": run_id})


def persist(context: Context, site_dir: Path, config: ConfigRecord, cache_dir: Path | None = None) -> None:
    """Save this node's state after the training round in `config` (see the module doc)."""
    sent = decode_round_config(config)
    if sent.run_id is None:
        return
    folder = _folder(site_dir, sent.run_id, cache_dir)
    server_round = sent.server_round
    state = {
        "arrays": {n: ArrayRecord(dict(r)) for n, r in context.state.array_records.items()},
        "configs": {n: dict(r) for n, r in context.state.config_records.items() if n != _MARK},
        "metrics": {n: dict(r) for n, r in context.state.metric_records.items()},
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_state(_file(folder, server_round), state)
        for old in sorted(folder.glob("round-*.npz"), key=_round_of)[:-_KEPT_FILES]:
            old.unlink()
    except OSError as exc:
        log.warning("cannot save the site's state in %s (a resumed run will not continue it): %s",
                    folder, exc)
