"""Wire audit, end to end through Flower's simulation engine.

Two synthetic hospitals, one of which has planted PHI in every DICOM header and in its
manifest's patient ids, and a third whose manifest is invalid. Every message a ClientApp
receives and every reply it sends is captured (tests/wire_capture.py) and checked: the
only arrays a site sends are the model's weights, every other vector has a fixed,
data-independent length, and no planted value appears in any message, the data cards,
runs.sqlite, summary.json or report.html. A site receives the global model and the
round's settings, never another site's update or name, unless the study turns on
cross-site evaluation (a second, smaller run), and then only in the cross-site message.
The invalid site fails alone, with a path-free reason the server records as missing.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pydicom
import pytest
import ray.cloudpickle

import tests.wire_capture
from fedir.client.embedding import MAX_DIM
from fedir.client.manifest import write_manifest
from fedir.models import NUM_CLASSES, build_model
from fedir.protocol import ARRAYS_KEY, CROSS_SITE_ACTION, check_drift
from fedir.simulations.scenario import load_scenario
from fedir.simulations.simulate import simulate
from fedir.simulations.synthetic import generate_federation
from tests.phi import PLANTED, needles, plant, planted_numbers
from tests.wire_capture import RECEIVED, SENT, CaptureMessages, read_captured

pytestmark = pytest.mark.slow

HIST_BINS = 20
ROUNDS = 2
BROKEN_FILE = "DOE_JOHN_19450317.dcm"
SITES = ("site-0", "site-1", "site-broken")


def _plant_site(site: Path) -> list[str]:
    """Plant PHI in every header of `site` and make its patient ids MRN-like; return them."""
    with (site / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = {old: f"{PLANTED['PatientID']}-{i:03d}" for i, old in enumerate(dict.fromkeys(r["patient_id"] for r in rows))}
    for row in rows:
        row["patient_id"] = ids[row["patient_id"]]
        plant(site / row["path"], patient_id=row["patient_id"])
    write_manifest(site, rows)
    assert str(pydicom.dcmread(site / rows[0]["path"]).PatientName) == PLANTED["PatientName"]
    return list(ids.values())


def _broken_site(site: Path, label: int) -> None:
    """A site whose one image is a PHI-named empty file; with label 7 its manifest also has a
    label outside the task's classes."""
    site.mkdir(exist_ok=True)
    (site / BROKEN_FILE).write_bytes(b"")
    write_manifest(site, [{"patient_id": PLANTED["PatientID"], "path": BROKEN_FILE, "label": label}])


def _audit(tmp: Path, rounds: int, extra_toml: str = "") -> dict:
    """One simulated study on the planted federation, every message captured."""
    fed = tmp / "fed"
    generate_federation(fed, sites=2, patients=24, seed=5, image_size=32, progress=False)
    patient_ids = _plant_site(fed / "site-0")
    _broken_site(fed / "site-broken", label=1)
    toml = tmp / "audit.toml"
    toml.write_text(
        '[federation]\nsites = ["fed/site-0", "fed/site-1", "fed/site-broken"]\n'
        f"[train]\nrounds = {rounds}\nlocal-epochs = 1\n[model]\nimage-size = 32\n"
        f"[eval]\nbootstrap = 50\nhist-bins = {HIST_BINS}\n{extra_toml}"
    )
    capture = tmp / "capture"
    capture.mkdir()
    ray.cloudpickle.register_pickle_by_value(tests.wire_capture)  # Ray workers cannot import tests/
    out = tmp / "run"
    # A simulation refuses a bad manifest when the scenario is read; a hospital's manifest
    # can go bad after that (and in deployment the coordinator never reads it): break the
    # site after loading, so that its ClientApp fails at run time and its reasons are audited.
    settings = load_scenario(toml)
    _broken_site(fed / "site-broken", label=7)
    summary = simulate(settings, out, scenario=str(toml), client_mods=[CaptureMessages(str(capture))])
    return {"out": out, "summary": summary, "replies": read_captured(capture, SENT),
            "received": read_captured(capture, RECEIVED), "rounds": rounds, "fed": fed,
            "needles": needles(patient_ids), "settings": settings}


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default settings: cross-site evaluation off."""
    return _audit(tmp_path_factory.mktemp("audit"), ROUNDS)


@pytest.fixture(scope="module")
def cross_site_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One round with `bias.cross-site = true`."""
    return _audit(tmp_path_factory.mktemp("audit-cross-site"), 1, "[bias]\ncross-site = true\n")


@pytest.fixture(params=["audited_run", "cross_site_run"])
def any_run(request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue(request.param)


def _model_arrays(settings) -> dict:
    model = build_model(settings.model_name).state_dict()
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.items()}


def test_only_the_models_weights_and_fixed_length_vectors_leave_a_site(any_run: dict) -> None:
    replies, rounds = any_run["replies"], any_run["rounds"]
    cross = any_run["settings"].bias_cross_site
    # 2 working sites x (train + evaluate) x rounds, plus each one's answer to the
    # server's feature-statistics query and, when the study asks for it, to the
    # cross-site evaluation after the last round; the broken site sends only errors.
    assert len(replies) == 2 * 2 * rounds + 2 + (2 if cross else 0)
    assert sum(r["message_type"] == "query" for r in replies) == 2
    assert sum(r["message_type"] == CROSS_SITE_ACTION for r in replies) == (2 if cross else 0)
    model = build_model(any_run["settings"].model_name).state_dict()
    weights = {f"arrays/{k}": v for k, v in _model_arrays(any_run["settings"]).items()}
    # the embedding's summary statistics: per class and overall, a count, a mean and a
    # covariance of the (projected) penultimate features; never one row per image
    d = min(model["fc.weight"].shape[1], MAX_DIM)
    moments = {"embedding/counts": ((NUM_CLASSES + 1,), "int64"),
               "embedding/means": ((NUM_CLASSES + 1, d), "float32"),
               "embedding/covs": ((NUM_CLASSES + 1, d, d), "float32")}
    for reply in replies:
        expected = {"train": weights, "evaluate": moments}.get(reply["message_type"], {})
        assert reply["arrays"] == expected, reply["message_type"]
        # list lengths: 0 (an imaging site's feature sums), CIs and classes (2), histogram
        # bins; in a cross-site row, one entry per site model (2) and their CIs (4)
        allowed = {0, 2, NUM_CLASSES, HIST_BINS} | ({2, 4} if reply["message_type"] == CROSS_SITE_ACTION else set())
        for key, value in reply["metrics"].items():
            if isinstance(value, list):
                assert len(value) in allowed, key
        for key, value in reply["configs"].items():
            assert isinstance(value, str), key


def _site_updates(run: dict) -> set[str]:
    """The digests of every update a site sent."""
    return {r["digests"][ARRAYS_KEY] for r in run["replies"] if r["message_type"] == "train"}


def _assert_only_the_global_model_and_settings(message: dict, run: dict) -> None:
    """A train or evaluate message carries the global model, a query none; neither carries a
    site's own update, and nothing names a site of the federation."""
    expected = {"train": {ARRAYS_KEY}, "evaluate": {ARRAYS_KEY}}.get(message["message_type"], set())
    assert set(message["digests"]) == expected, message["message_type"]
    if expected:  # the model's names and shapes (Flower's average turns int counters into floats)
        shapes = {f"{ARRAYS_KEY}/{k}": shape for k, (shape, _) in _model_arrays(run["settings"]).items()}
        assert {k: shape for k, (shape, _) in message["arrays"].items()} == shapes
    assert not set(message["digests"].values()) & _site_updates(run), message["message_type"]
    text = json.dumps({k: message[k] for k in ("arrays", "metrics", "configs")})
    for site in SITES:
        assert site not in text, (message["message_type"], site)


def test_by_default_a_site_receives_the_global_model_and_settings_only(audited_run: dict) -> None:
    received = audited_run["received"]
    # every site, the broken one too: the query, then train and evaluate each round
    assert len(received) == 3 * (1 + 2 * ROUNDS)
    assert {r["partition"] for r in received} == {0, 1, 2}
    assert _site_updates(audited_run)  # the sites did send updates the check looks for
    for message in received:
        assert message["message_type"] != CROSS_SITE_ACTION
        _assert_only_the_global_model_and_settings(message, audited_run)


def test_with_cross_site_on_only_the_cross_site_message_carries_site_models(cross_site_run: dict) -> None:
    cross = [r for r in cross_site_run["received"] if r["message_type"] == CROSS_SITE_ACTION]
    assert len(cross) == 3  # every connected node is asked, the broken site too
    updates = _site_updates(cross_site_run)
    for message in cross:
        # the two working sites' last updates, under their names
        assert set(message["digests"]) == {"model-0", "model-1"}
        assert set(message["digests"].values()) == updates
        assert sorted(json.loads(message["configs"]["models/names"])) == ["site-0", "site-1"]
    for message in cross_site_run["received"]:
        if message["message_type"] != CROSS_SITE_ACTION:
            _assert_only_the_global_model_and_settings(message, cross_site_run)


def test_no_planted_value_leaves_a_site_or_reaches_one(any_run: dict) -> None:
    numbers = planted_numbers()
    for message in any_run["replies"] + any_run["received"]:
        text = json.dumps({k: v for k, v in message.items() if k not in ("arrays", "digests")})
        for needle in any_run["needles"]:
            assert needle not in text, needle
        for value in message["metrics"].values():
            for number in value if isinstance(value, list) else [value]:
                assert float(number) not in numbers


def test_no_planted_value_in_the_run_store_summary_or_report(audited_run: dict) -> None:
    out = audited_run["out"]
    con = sqlite3.connect(out / "runs.sqlite")
    tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    stored = json.dumps({t: con.execute(f"SELECT * FROM {t}").fetchall() for t in tables})
    con.close()
    for name, text in [("runs.sqlite", stored), ("summary.json", (out / "summary.json").read_text()),
                       ("report.html", (out / "report.html").read_text())]:
        for needle in audited_run["needles"] + [BROKEN_FILE]:
            assert needle not in text, (name, needle)


def test_each_working_site_sends_its_card_once_and_the_report_shows_it(audited_run: dict) -> None:
    cards = [json.loads(r["configs"]["site/data-card"]) for r in audited_run["replies"]
             if "site/data-card" in r["configs"]]
    assert len(cards) == 2 and all(card["k"] == 5 for card in cards)
    assert {card["acquisition"]["Modality"]["values"].get("XA") for card in cards} == {24}
    con = sqlite3.connect(audited_run["out"] / "runs.sqlite")
    assert sorted(site for (site,) in con.execute("SELECT site FROM cards")) == ["site-0", "site-1"]
    con.close()
    report = (audited_run["out"] / "report.html").read_text()
    assert "<h2>Data cards</h2>" in report and "Modality" in report


def test_drift_leaves_a_site_as_period_labels_and_aggregates_only(audited_run: dict) -> None:
    """Every evaluation reply carries the site's periods (the synthetic manifests date every
    row), as check_drift lets them cross; no acquired date of a manifest is in any of them."""
    drifts = [json.loads(r["configs"]["site/drift"]) for r in audited_run["replies"] if r["message_type"] == "evaluate"]
    assert len(drifts) == 2 * ROUNDS
    dates = {row["acquired"] for site in ("site-0", "site-1")
             for row in csv.DictReader((audited_run["fed"] / site / "manifest.csv").open())}
    assert dates
    for drift in drifts:
        assert check_drift(drift) == drift and drift["unit"] == "year"
        assert drift["periods"]  # 6 test patients over five years: every period suppressed
        assert all(set(p) == {"period", "suppressed"} for p in drift["periods"])
        assert not any(date in json.dumps(drift) for date in dates)


def test_an_invalid_site_fails_alone_and_is_recorded_as_missing(audited_run: dict) -> None:
    summary = audited_run["summary"]
    assert summary["rounds"] == ROUNDS
    assert all(summary["per_site"][s]["n_test"] > 0 for s in ("site-0", "site-1"))
    missing = [n["message"] for n in summary["notes"] if n["kind"] == "missing"]
    assert len(missing) == 2 * ROUNDS  # train and evaluate, every round
    assert all("row 2: a label is outside the task's classes 0..1" in m for m in missing), missing
    assert all("fedir data check" in m and "/" not in m.split("Message:")[-1] for m in missing), missing


def _as_captured(entry: dict) -> tuple:
    """An audit-log entry (fedir.client.audit_log) in the wire capture's terms."""
    arrays = {f"{rec}/{key}": (tuple(shape), dtype) for rec, keys in entry["arrays"].items()
              for key, (dtype, shape) in keys.items()}
    metrics = sorted(f"{rec}/{key}" for rec, keys in entry["metrics"].items() for key in keys)
    configs = sorted(f"{rec}/{key}" for rec, keys in entry["configs"].items() for key in keys)
    return entry["direction"], entry["message_type"], sorted(arrays.items()), metrics, configs


def _captured(record: dict) -> tuple:
    return (record["direction"], record["message_type"], sorted(record["arrays"].items()),
            sorted(record["metrics"]), sorted(record["configs"]))


def test_each_sites_audit_log_matches_what_crossed_the_wire(any_run: dict) -> None:
    """The site's own audit trail, read back, lists every message the capture saw at that
    site, in both directions, with the same record and array names and shapes."""
    from fedir.client.audit_log import AUDIT_DIR, read_log

    captured = any_run["received"] + any_run["replies"]
    for partition, site in enumerate(SITES):
        log = read_log(any_run["fed"] / site / AUDIT_DIR)
        assert log, site
        assert all(e["run"] == log[0]["run"] for e in log)
        on_wire = sorted(_captured(r) for r in captured if r["partition"] == partition)
        assert sorted(_as_captured(e) for e in log) == on_wire, site
