"""A real deployment on 127.0.0.1: `flower-superlink` with TLS, registered-node
authentication and no runtime dependency installation; node keys registered with
`flwr supernode register`; three `flower-supernode`s with their site folder in node
config; the study started with `flwr run . coordinator` (the connection in an isolated
Flower config). Then what a stranger can and cannot do."""

import http.client
import json
import ssl
import time
from pathlib import Path

import pytest
from flower_deployment import (
    CONNECTION,
    Processes,
    any_of,
    exited,
    flwr,
    flwr_env,
    free_port,
    run_ended,
    started_run,
    superlink_args,
    supernode_args,
    wait_for,
    wait_for_file,
    wait_for_port,
    write_flower_config,
)

from fedir.certs import init_ca, node_keys
from fedir.server.runstore import RunStore
from fedir.simulations.synthetic import generate_federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROJECT = Path(__file__).resolve().parents[1]
SITES = [f"site-{i}" for i in range(3)]
SUMMARY_KEYS = {"run_id", "scenario", "rounds", "sites", "global", "per_site", "bias"}
EXIT_NODE_AUTH_FAILED = 305  # flwr.supercore.exit.ExitCode for an unregistered node key


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A TLS + node-auth SuperLink with SITES registered and their SuperNodes running."""
    tmp = tmp_path_factory.mktemp("deploy")
    fed = tmp / "fed"
    generate_federation(fed, sites=3, patients=16, seed=3, image_size=32, progress=False)
    certs = tmp / "certs"
    init_ca(certs, ["127.0.0.1", "localhost"])
    for site in [*SITES, "stranger"]:
        node_keys(certs, site)
    port = free_port()
    home = tmp / "flwr-home"
    write_flower_config(home, port, certs / "ca.crt")
    env = flwr_env(home)
    procs = Processes(tmp)
    try:
        superlink = procs.start("superlink", superlink_args(certs, port, tmp / "superlink.db"), env, tmp)
        wait_for_port(port, superlink, procs.log("superlink"))
        for site in SITES:
            reg = flwr(["supernode", "register", str(certs / "nodes" / f"{site}.pub"), CONNECTION,
                        "--name", site], env, tmp)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site in SITES:
            procs.start(site, supernode_args(certs, port, certs / "nodes" / f"{site}.key",
                                             fed / site, free_port()), env, tmp)
        yield {"tmp": tmp, "fed": fed, "certs": certs, "port": port, "env": env, "procs": procs}
    finally:
        procs.stop_all()


def _run_config(out: Path, rounds: int) -> str:
    return (f'federation.sites="{";".join(SITES)}" train.rounds={rounds} train.local-epochs=1 '
            f'model.name="resnet_small" model.image-size=32 eval.bootstrap=50 output.dir="{out}"')


def test_two_rounds_over_tls_with_registered_nodes_write_the_summary(coordinator):
    out = coordinator["tmp"] / "run"
    started = time.monotonic()
    run = flwr(["run", ".", CONNECTION, "--run-config", _run_config(out, 2)],
               coordinator["env"], PROJECT)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for_file(out / "summary.json", started_run(run), coordinator["env"], PROJECT)
    print(f"\n2 deployment rounds (TLS + node auth, 3 SuperNodes): {time.monotonic() - started:.1f}s")
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["rounds"] == 2 and summary["sites"] == SITES
    assert set(summary["per_site"]) == set(SITES)
    assert all(summary["per_site"][s]["n_test"] > 0 for s in SITES)


def test_a_secure_aggregation_study_over_tls_sends_only_masked_updates(coordinator):
    """privacy.secure-aggregation = "secagg+" through the real SuperLink and SuperNodes: the
    four SecAgg+ stages of each round cross TLS, and the round's model is the unmasked sum."""
    out = coordinator["tmp"] / "run-secagg"
    logs = {site: coordinator["tmp"] / f"{site}.log" for site in SITES}
    seen = {site: log.read_text().count("Receiving: train message") for site, log in logs.items()}
    started = time.monotonic()
    run = flwr(["run", ".", CONNECTION, "--run-config",
                _run_config(out, 1) + ' privacy.secure-aggregation="secagg+"'], coordinator["env"], PROJECT)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for_file(out / "summary.json", started_run(run), coordinator["env"], PROJECT)
    print(f"\n1 SecAgg+ deployment round (TLS + node auth, 3 SuperNodes): {time.monotonic() - started:.1f}s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["privacy"]["secure_aggregation"] == "secagg+"
    assert set(summary["per_site"]) == set(SITES)
    assert not [n for n in summary["notes"] if n["kind"] in ("missing", "rejected")], summary["notes"]
    # each site answered the round's four SecAgg+ stages (setup, keys, masked update, unmask)
    for site, log in logs.items():
        assert log.read_text().count("Receiving: train message") - seen[site] == 4


def test_a_supernode_whose_key_is_not_registered_is_refused(coordinator):
    c = coordinator
    proc = c["procs"].start("stranger", supernode_args(
        c["certs"], c["port"], c["certs"] / "nodes" / "stranger.key", c["fed"] / "site-0", free_port()),
        c["env"], c["tmp"])
    # no deadline: the SuperNode gives up by itself (supernode_args: --max-retries, --max-wait-time)
    assert proc.wait() != 0
    log = (c["tmp"] / "stranger.log").read_text()
    assert f"Exit Code: {EXIT_NODE_AUTH_FAILED}" in log and "Failed to activate SuperNode" in log
    # the registered sites, same CA and same SuperLink, were let in
    assert "SuperNode ID:" in (c["tmp"] / "site-0.log").read_text()


def test_a_supernode_without_the_ca_certificate_cannot_connect(coordinator):
    c = coordinator
    proc = c["procs"].start("no-ca", supernode_args(
        None, c["port"], c["certs"] / "nodes" / "site-0.key", c["fed"] / "site-0", free_port()),
        c["env"], c["tmp"])
    assert proc.wait() != 0  # it gives up by itself, as above
    assert "CERTIFICATE_VERIFY_FAILED" in (c["tmp"] / "no-ca.log").read_text()


def test_no_plaintext_port_is_open(coordinator):
    c = coordinator
    plain = http.client.HTTPConnection("127.0.0.1", c["port"], timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, ssl.SSLError, OSError)):
        plain.request("GET", "/")
        plain.getresponse()
    # The same port does answer when TLS is used, with the study's CA.
    ctx = ssl.create_default_context(cafile=str(c["certs"] / "ca.crt"))
    tls = http.client.HTTPSConnection("127.0.0.1", c["port"], timeout=10, context=ctx)
    tls.request("GET", "/")
    assert tls.getresponse().status < 600
    # And the flwr CLI told to connect without TLS gets nowhere.
    home = c["tmp"] / "flwr-home-insecure"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\naddress = "127.0.0.1:{c["port"]}"\n'
        "insecure = true\n")
    listed = flwr(["ls", "plain"], {**c["env"], "FLWR_HOME": str(home)}, c["tmp"])
    assert listed.returncode != 0


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(coordinator):
    """Last in this module: it kills site-2's SuperNode for good, in round 2, so the
    missing note names the site it answered as in round 1."""
    c = coordinator
    out = c["tmp"] / "run-kill"
    log = c["tmp"] / "site-2.log"
    seen = log.read_text().count("Receiving: train message")
    run = flwr(["run", ".", CONNECTION, "--run-config",
                _run_config(out, 2) + " federation.min-sites=2"], c["env"], PROJECT)
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = started_run(run)
    site2 = next(p for p in c["procs"].procs if str(c["certs"] / "nodes" / "site-2.key") in p.args)
    # round 2 reaches site-2 when round 1 is done, however long that takes here; it cannot
    # once site-2's SuperNode has exited or the run has ended
    wait_for(lambda: log.read_text().count("Receiving: train message") >= seen + 2,
             any_of(exited(site2, log), run_ended(run_id, c["env"], PROJECT)), poll=0.5)
    started = time.monotonic()
    c["procs"].kill(site2)  # the SuperNode and its ClientApp process, mid-training
    # the SuperLink answers for site-2 once it misses its heartbeats; the others finish the round
    wait_for_file(out / "summary.json", run_id, c["env"], PROJECT)
    print(f"\nround with a SuperNode killed mid-training finished {time.monotonic() - started:.1f}s later")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    missing = [n for n in summary["notes"] if n["kind"] == "missing"]
    assert missing and all(n["round"] == 2 and n["site"] == "site-2" for n in missing), missing
    assert any("train failed" in n["message"] and "Node Unavailable" in n["message"] for n in missing), \
        summary["notes"]
    # round 2's test metrics are the other sites' only; summary.json's per_site are those of
    # the round selected on validation, which may be round 1 (site-2 still in it)
    with RunStore(out / "runs.sqlite") as store:
        assert set(store.site_metrics(summary["run_id"], 2)) == {"site-0", "site-1", "global"}
        assert summary["evaluated_round"] == summary["selection"]["round"] in store.evaluated_rounds(summary["run_id"])
