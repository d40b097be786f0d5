"""Faulty sites through Flower's simulation engine: one ClientApp returns NaNs, one a wrong
shape, one an update 1000x too large. Each is rejected with its reason in runs.sqlite and
the report, the two clean sites carry the rounds, and the global model stays finite."""

import sqlite3

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.simulation import run_simulation

from fedir.client.client_app import build_client_app
from fedir.config import Settings
from fedir.protocol import ARRAYS_KEY
from fedir.server.server_app import build_server_app
from fedir.simulations.simulate import backend_config
from fedir.simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow


def _nan(update: dict, sent: dict) -> dict:
    name = next(k for k, v in update.items() if v.dtype.kind == "f")
    return update | {name: np.full_like(update[name], np.nan)}


def _wrong_shape(update: dict, sent: dict) -> dict:
    name = next(k for k, v in update.items() if v.ndim == 4)
    return update | {name: np.zeros(update[name].shape[:-1] + (update[name].shape[-1] + 1,),
                                     update[name].dtype)}


def _huge(update: dict, sent: dict) -> dict:
    return {k: (sent[k] + 1000 * (v - sent[k])).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in update.items()}


FAULTS = {"site-2": _nan, "site-3": _wrong_shape, "site-4": _huge}


def corrupt_training_replies(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: fedir's real ClientApp runs, and the training reply of some
    sites is corrupted on the way out (every other message passes untouched)."""
    reply = call_next(msg, context)
    site = f"site-{context.node_config['partition-id']}"
    if msg.metadata.message_type.startswith("train") and site in FAULTS and not reply.has_error():
        sent = msg.content.array_records[ARRAYS_KEY].to_numpy_ndarrays()
        got = reply.content.array_records[ARRAYS_KEY]
        names = list(got)
        update = dict(zip(names, got.to_numpy_ndarrays()))
        bad = FAULTS[site](update, dict(zip(names, sent)))
        reply.content.array_records[ARRAYS_KEY] = ArrayRecord(
            {k: Array(np.array(v, order="C")) for k, v in bad.items()})
    return reply


def test_faulty_updates_are_rejected_with_their_reason(tmp_path):
    fed = tmp_path / "fed"
    generate_federation(fed, sites=5, patients=16, seed=3, image_size=32, progress=False)
    out = tmp_path / "run"
    settings = Settings.from_run_config({
        "federation.sites": ";".join(str(fed / f"site-{i}") for i in range(5)),
        "train.rounds": 2, "train.local-epochs": 1, "model.image-size": 32,
        "eval.bootstrap": 50, "output.dir": str(out), "validation.min-accepted": 2,
    })
    run_simulation(server_app=build_server_app(settings, out, "faulty"),
                   client_app=build_client_app(settings, mods=[corrupt_training_replies]), num_supernodes=5,
                   backend_config=backend_config(settings))

    con = sqlite3.connect(out / "runs.sqlite")
    notes = con.execute("SELECT round, site, message FROM notes WHERE kind = 'rejected'").fetchall()
    con.close()
    by_site = {(r, s): m for r, s, m in notes}
    assert set(by_site) == {(r, s) for r in (1, 2) for s in FAULTS}, notes
    for r in (1, 2):
        assert by_site[(r, "site-2")].startswith("non-finite values")
        assert by_site[(r, "site-3")].startswith("wrong shape for")
        assert "the median of the other sites" in by_site[(r, "site-4")]
    model = torch.load(out / "model.pt")
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    report = (out / "report.html").read_text()
    assert "update rejected" in report and "non-finite values" in report
