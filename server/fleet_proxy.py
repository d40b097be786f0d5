"""The coordinator's front door for hospitals: an nginx configuration that forwards only
the routes a SuperNode calls.

Why: in Flower 1.41 `flower-superlink` serves the Fleet API (SuperNodes), the Control API
(`flwr run`, `flwr supernode register`, ...) and the Runtime API (the ServerApp process)
from one HTTP port (`--host`/`--port`; `--fleet-api-address` and `--control-api-address`
are deprecated and no longer split them), and the CA certificate that lets a hospital
verify the coordinator is no secret. So whoever reaches that port can register nodes and
start runs. fedir's deployment binds the SuperLink to the coordinator's loopback and puts
nginx in front of it, terminating TLS with the SuperLink's certificate and forwarding
exactly `FLEET_ROUTES` (POST only) to it; everything else is answered 403 by nginx and
never reaches Flower. Node authentication still happens at the SuperLink (the signed
headers pass through unchanged).
"""

from __future__ import annotations

from pathlib import Path

# Every path `flower-supernode` calls (flwr/supernode/fleet_http_client.py, Flower 1.41).
# tests/test_fleet_proxy.py checks this list against the SuperLink's own Fleet router, so
# a Flower upgrade that adds a Fleet route fails a test instead of breaking SuperNodes.
FLEET_ROUTES: tuple[str, ...] = (
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)


# Flower 1.41 cuts every array into objects of at most 5 MiB
# (flwr.common.constant.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE); only responses (the app bundle) are larger;
# 8 MiB leaves room for a message's own protobuf and headers.
MAX_BODY = "8m"


def _route_regex() -> str:
    names = "|".join(r.removeprefix("/v1/fleet/") for r in FLEET_ROUTES)
    return f"^/v1/fleet/({names})$"


def nginx_config(listen: str, superlink: str, certs: str | Path, prefix: str | Path,
                 upstream_name: str = "localhost", user: str | None = None) -> str:
    """A complete nginx.conf for `nginx -p PREFIX -c PREFIX/nginx.conf`.

    listen: address:port the hospitals dial (a name on the server certificate);
    superlink: address:port of the SuperLink, bound to the coordinator's loopback;
    certs: the folder `fedir certs init` wrote (ca.crt, server.crt, server.key);
    upstream_name: the name nginx checks on the SuperLink's certificate (nginx verifies
    DNS names, not IP addresses, so it must be a DNS name on that certificate);
    user: the user nginx's workers run as (only when nginx is started as root).
    Logs, pid file and temporary files stay inside `prefix`.
    """
    certs = Path(certs).resolve()
    prefix = Path(prefix).resolve()
    head = f"user {user};\n" if user else ""
    return f"""# Written by fedir (fedir proxy nginx-conf). Hospitals reach only the Fleet API.
{head}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server_tokens off;

    server {{
        listen {listen} ssl;
        ssl_certificate {certs}/server.crt;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;

        # Flower sends arrays in pieces of at most 5 MiB (push-object), and reads a whole
        # request before it checks the node's signature: a cap keeps an unauthenticated
        # body from making the SuperLink hold hundreds of MB. No buffering.
        client_max_body_size {MAX_BODY};
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;

        # The SuperNode's routes, POST only, to the SuperLink over TLS (verified with the study CA).
        location ~ {_route_regex()} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://{superlink};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {certs}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
        }}

        # Control API, Runtime API, /docs, /health and anything else: refused here.
        location / {{
            return 403;
        }}
    }}
}}
"""


def write_nginx_config(directory: str | Path, listen: str, superlink: str, certs: str | Path,
                       upstream_name: str = "localhost", user: str | None = None) -> Path:
    """Write DIR/nginx.conf and the temporary folders it names; return the file."""
    directory = Path(directory)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(nginx_config(listen, superlink, certs, directory, upstream_name, user))
    return conf
