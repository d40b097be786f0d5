"""Approved apps only, in a real deployment on 127.0.0.1: a TLS + node-auth SuperLink and
three sites, each running `fedir site supernode` (Flower's SuperNode behind the site's
allow-list) and each having approved one copy of the project with `fedir site approve`.
The coordinator submits a second copy whose ClientApp differs by one line: every site
refuses it before anything of it is installed, the coordinator's run fails with the
sites' reason, and the SuperNodes stay up and run the approved copy's round."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from flower_deployment import (
    BIN,
    CONNECTION,
    Processes,
    exited,
    flwr,
    flwr_env,
    free_port,
    superlink_args,
    supernode_args,
    wait_for,
    wait_for_port,
    write_flower_config,
)
from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION

from fedir.certs import init_ca, node_keys
from fedir.client.approval import fab_bytes, fab_digest
from fedir.simulations.synthetic import generate_federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PROJECT = Path(__file__).resolve().parents[1]
SITES = [f"site-{i}" for i in range(3)]
NOT_THE_APP = (".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "runs", "demo-data",
               "build", ".fedir-cache", "test-artifacts")
ONE_LINE = "\nUNREVIEWED = True  # one line the sites never approved\n"


def site_env(tmp: Path, site: str) -> dict[str, str]:
    """A hospital's own Flower home, where its SuperNode's ClientApps unpack their bundles."""
    return flwr_env(tmp / f"{site}-flwr-home")


def unpacked(tmp: Path, site: str, digest: str) -> bool:
    """Whether a bundle with this digest was unpacked for a ClientApp at the site."""
    apps = tmp / f"{site}-flwr-home" / APP_DIR
    return any(p.name.endswith(f".{digest[:FAB_HASH_TRUNCATION]}") for p in apps.glob("*"))


def _copy_project(to: Path) -> Path:
    shutil.copytree(PROJECT, to, ignore=shutil.ignore_patterns(*NOT_THE_APP))
    return to


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The SuperLink, the sites registered, each site's allow-list holding the approved copy,
    and their gated SuperNodes running."""
    tmp = tmp_path_factory.mktemp("approval")
    fed = tmp / "fed"
    generate_federation(fed, sites=3, patients=16, seed=3, image_size=32, progress=False)
    approved, changed = _copy_project(tmp / "approved"), _copy_project(tmp / "changed")
    assert fab_digest(fab_bytes(changed)) == fab_digest(fab_bytes(approved))  # the same app, so far
    with (changed / "client" / "client_app.py").open("a") as client_app:
        client_app.write(ONE_LINE)
    certs = tmp / "certs"
    init_ca(certs, ["127.0.0.1", "localhost"])
    for site in SITES:
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
            ok = subprocess.run([str(BIN / "fedir"), "site", "approve", str(approved), "--allow-list",
                                 str(tmp / f"{site}-approved.json"), "--note", "test review"],
                                env=site_env(tmp, site), cwd=tmp, capture_output=True, text=True, timeout=300)
            assert ok.returncode == 0, ok.stdout + ok.stderr
        for site in SITES:
            flower = supernode_args(certs, port, certs / "nodes" / f"{site}.key", fed / site, free_port())
            procs.start(site, [str(BIN / "fedir"), "site", "supernode", "--allow-list",
                               str(tmp / f"{site}-approved.json"), "--", *flower[1:]], site_env(tmp, site), tmp)
        yield {"tmp": tmp, "env": env, "procs": procs, "approved": approved, "changed": changed,
               "superlink": exited(superlink, procs.log("superlink"))}
    finally:
        procs.stop_all()


def _run_config(out: Path, rounds: int) -> str:
    return (f'federation.sites="{";".join(SITES)}" train.rounds={rounds} train.local-epochs=1 '
            f'model.name="resnet_small" model.image-size=32 eval.bootstrap=50 output.dir="{out}"')


def _start(app: Path, out: Path, env: dict[str, str], tmp: Path) -> str:
    run = flwr(["run", str(app), CONNECTION, "--run-config", _run_config(out, 1), "--format", "json"], env, tmp)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout[run.stdout.index("{"):])["run-id"]


def _finished(run_id: str, c: dict) -> dict:
    """The run's row in `flwr ls` once Flower reports it finished (however long that takes
    on a loaded machine), unless the SuperLink has exited."""
    rows: list[dict] = []

    def finished() -> bool:
        ls = flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], c["env"], c["tmp"])
        assert ls.returncode == 0, ls.stdout + ls.stderr
        (row,) = json.loads(ls.stdout[ls.stdout.index("{"):])["runs"]
        rows.append(row)
        return row["status"].startswith("finished")

    wait_for(finished, c["superlink"])
    return rows[-1]


def test_an_app_changed_by_one_line_is_refused_by_every_site(sites):
    c = sites
    digest = fab_digest(fab_bytes(c["changed"]))
    assert digest != fab_digest(fab_bytes(c["approved"]))
    run_id = _start(c["changed"], c["tmp"] / "run-changed", c["env"], c["tmp"])
    row = _finished(run_id, c)
    assert row["status"] == "finished:failed"
    assert f"app sha256 {digest} is not approved at this site" in row["status-details"], row
    for site in SITES:
        log = (c["tmp"] / f"{site}.log").read_text()
        assert f"run {run_id} refused: app fedir/fedir 0.1.0 sha256 {digest} is not in the allow-list" in log
        assert not unpacked(c["tmp"], site, digest)  # nothing of it reached a ClientApp
    assert all(p.poll() is None for p in c["procs"].procs)  # every SuperNode is still up


def test_the_approved_app_runs_its_round_on_the_same_supernodes(sites):
    c = sites
    out = c["tmp"] / "run-approved"
    run_id = _start(c["approved"], out, c["env"], c["tmp"])
    row = _finished(run_id, c)
    assert row["status"] == "finished:completed", row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and set(summary["per_site"]) == set(SITES)
    assert all(summary["per_site"][s]["n_test"] > 0 for s in SITES)
    digest = fab_digest(fab_bytes(c["approved"]))
    for site in SITES:
        assert f"run {run_id}: app fedir/fedir 0.1.0 sha256 {digest} approved" in \
            (c["tmp"] / f"{site}.log").read_text()
        assert unpacked(c["tmp"], site, digest)  # where the refused one would have been

