"""The control plane stays with the coordinator (DEPLOY.md, step 3).

The SuperLink listens on 127.0.0.1 only (the coordinator's loopback); nginx, configured by
`fedir proxy`, listens on 127.0.0.2 (the address hospitals dial) and forwards only the
Fleet routes. A 'site' process that has the CA certificate and dials 127.0.0.2 runs its
SuperNode through a real study, and its `flwr supernode register` and `flwr run` are
refused; the coordinator, on 127.0.0.1, sees neither a new node nor a new run."""

import http.client
import json
import ssl
from pathlib import Path

import pytest
from flower_deployment import (
    CONNECTION,
    NGINX,
    Processes,
    flwr,
    flwr_env,
    free_port,
    nginx_args,
    port_open,
    started_run,
    superlink_args,
    supernode_args,
    wait_for_file,
    wait_for_port,
    write_flower_config,
)

from fedir.certs import init_ca, node_keys
from fedir.server.fleet_proxy import FLEET_ROUTES, write_nginx_config
from fedir.simulations.synthetic import generate_federation

PROJECT = Path(__file__).resolve().parents[1]
SITE_HOST = "127.0.0.2"  # where the hospitals' traffic arrives: nginx only
SITES = ["site-0", "site-1"]

needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx not installed (make nginx)")


def test_the_proxy_forwards_exactly_the_routes_flower_supernode_calls():
    """FLEET_ROUTES is the SuperLink's Fleet router, and every path the SuperNode's client calls."""
    import inspect

    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode import fleet_http_client

    served = {route.path for route in router.routes}
    called = {line.split('"')[1] for line in inspect.getsource(fleet_http_client).splitlines()
              if 'path="/v1/' in line}
    assert set(FLEET_ROUTES) == served == called
    assert not any(r.startswith(("/v1/control", "/v1/runtime")) for r in FLEET_ROUTES)


@needs_nginx
def test_nginx_accepts_the_configuration_fedir_proxy_writes(tmp_path, capsys):
    import subprocess

    from fedir.cli import main

    certs = tmp_path / "certs"
    init_ca(certs, ["localhost"])
    assert main(["proxy", str(tmp_path / "proxy"), "--listen", "127.0.0.2:9443",
                 "--superlink", "127.0.0.1:9000", "--certs", str(certs)]) == 0
    conf = tmp_path / "proxy" / "nginx.conf"
    assert str(conf) in capsys.readouterr().out
    checked = subprocess.run(nginx_args(conf)[:-2] + ["-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "client_max_body_size 8m;" in conf.read_text()
    text = conf.read_text()
    assert "listen 127.0.0.2:9443 ssl;" in text and "proxy_pass https://127.0.0.1:9000;" in text
    assert "location /" in text and "return 403" in text


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """SuperLink on 127.0.0.1, nginx on SITE_HOST, SITES' SuperNodes dialling nginx."""
    tmp = tmp_path_factory.mktemp("proxy")
    fed = tmp / "fed"
    generate_federation(fed, sites=len(SITES), patients=16, seed=4, image_size=32, progress=False)
    certs = tmp / "certs"
    init_ca(certs, ["127.0.0.1", SITE_HOST, "localhost"])
    for site in [*SITES, "intruder"]:
        node_keys(certs, site)
    port, proxy_port = free_port(), free_port()
    conf = write_nginx_config(tmp / "proxy", f"{SITE_HOST}:{proxy_port}", f"127.0.0.1:{port}", certs)
    home = tmp / "flwr-home"  # the coordinator's own flwr CLI: loopback
    write_flower_config(home, port, certs / "ca.crt")
    env = flwr_env(home)
    site_home = tmp / "flwr-home-site"  # a hospital's flwr CLI: what it can reach
    write_flower_config(site_home, proxy_port, certs / "ca.crt", host=SITE_HOST)
    site_env = flwr_env(site_home)
    procs = Processes(tmp)
    try:
        superlink = procs.start("superlink", superlink_args(certs, port, tmp / "superlink.db"), env, tmp)
        nginx = procs.start("nginx", nginx_args(conf), env, tmp)
        wait_for_port(port, superlink, procs.log("superlink"))
        wait_for_port(proxy_port, nginx, procs.log("nginx"), host=SITE_HOST)
        for site in SITES:
            reg = flwr(["supernode", "register", str(certs / "nodes" / f"{site}.pub"), CONNECTION,
                        "--name", site], env, tmp)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site in SITES:
            procs.start(site, supernode_args(certs, proxy_port, certs / "nodes" / f"{site}.key",
                                             fed / site, free_port(), host=SITE_HOST), site_env, tmp)
        yield {"tmp": tmp, "certs": certs, "port": port, "proxy_port": proxy_port, "env": env,
               "site_env": site_env}
    finally:
        procs.stop_all()


def _nodes(env: dict, cwd: Path) -> str:
    listed = flwr(["supernode", "ls", CONNECTION, "--format", "json"], env, cwd)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return listed.stdout


def _runs(env: dict, cwd: Path) -> list:
    listed = flwr(["ls", CONNECTION, "--format", "json"], env, cwd)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["runs"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_nginx
def test_a_site_cannot_register_nodes_or_start_runs_while_its_supernode_works(coordinator):
    c = coordinator
    # The SuperLink is not on the sites' address at all; nginx is.
    assert not port_open(SITE_HOST, c["port"])
    assert port_open(SITE_HOST, c["proxy_port"])

    # A site registering another node, and starting a run, through what it can reach.
    register = flwr(["supernode", "register", str(c["certs"] / "nodes" / "intruder.pub"), CONNECTION,
                     "--name", "intruder"], c["site_env"], c["tmp"])
    assert register.returncode != 0 and "403" in register.stdout + register.stderr, register.stdout
    started = flwr(["run", ".", CONNECTION, "--run-config", 'train.rounds=1'], c["site_env"], PROJECT)
    assert started.returncode != 0 and "403" in started.stdout + started.stderr, started.stdout
    assert flwr(["ls", CONNECTION], c["site_env"], c["tmp"]).returncode != 0

    # The coordinator (loopback) sees no intruder node and no run.
    assert "intruder" not in _nodes(c["env"], c["tmp"])
    assert _runs(c["env"], c["tmp"]) == []

    # Every other SuperLink route answers 403 from nginx; a Fleet route reaches Flower,
    # which wants a signed node identity (401).
    ctx = ssl.create_default_context(cafile=str(c["certs"] / "ca.crt"))
    for method, path, want in [("POST", "/v1/control/list-runs", 403), ("POST", "/v1/runtime/get-nodes", 403),
                               ("GET", "/docs", 403), ("GET", "/health", 403),
                               ("GET", "/v1/fleet/get-run", 403), ("POST", "/v1/fleet/get-run", 401)]:
        conn = http.client.HTTPSConnection(SITE_HOST, c["proxy_port"], timeout=30, context=ctx)
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Content-Type": "application/protobuf"})
        status = conn.getresponse().status
        conn.close()
        assert status == want or (want == 401 and status in (400, 401, 422)), (method, path, status)
    # A body larger than any piece Flower sends is refused by nginx before the SuperLink reads it.
    conn = http.client.HTTPSConnection(SITE_HOST, c["proxy_port"], timeout=60, context=ctx)
    conn.request("POST", "/v1/fleet/push-object", body=b"\0" * (9 * 1024 * 1024),
                 headers={"Content-Type": "application/protobuf"})
    assert conn.getresponse().status == 413
    conn.close()

    # Meanwhile the sites' SuperNodes, through the same proxy, take part in a real study
    # the coordinator starts.
    out = c["tmp"] / "run"
    run = flwr(["run", ".", CONNECTION, "--run-config",
                f'federation.sites="{";".join(SITES)}" train.rounds=1 train.local-epochs=1 '
                f'model.image-size=32 eval.bootstrap=50 output.dir="{out}"'], c["env"], PROJECT)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for_file(out / "summary.json", started_run(run), c["env"], PROJECT)
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["per_site"][s]["n_test"] > 0 for s in SITES), (summary["per_site"], summary.get("notes"))
    access = (c["tmp"] / "proxy" / "access.log").read_text()
    assert "/v1/fleet/push-messages" in access and "/v1/control/start-run" in access
