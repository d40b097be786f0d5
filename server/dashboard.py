"""`fedir dashboard`: a local web page over the run store that follows a run while it is written.

A small Starlette app (Starlette and uvicorn already come with Flower, so the dashboard adds
no web framework) serves one static page and two JSON endpoints; the page polls them every
few seconds and draws with plotly.js, served from the ``plotly`` package's own copy so that
nothing is fetched from the internet. Each JSON answer is read from ``runs.sqlite`` through
a read-only connection in one transaction (fedir.server.runreader), so the page never shows
half a round and never holds the server's write lock.
"""

from __future__ import annotations

import socket
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from fedir.server.dashboard_state import overview, run_detail
from fedir.server.runreader import StoreUnreadable

STATIC = Path(__file__).with_name("dashboard_static")
POLL_SECONDS = 2.0


def plotly_js() -> Path:
    """plotly.min.js as the ``plotly`` Python package ships it (no CDN: the page works offline)."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def create_app(folder: str | Path, poll_seconds: float = POLL_SECONDS) -> Starlette:
    """The dashboard over ``folder`` (a run folder, or a folder of run folders)."""
    folder = Path(folder)
    static = {
        "/": (STATIC / "index.html", "text/html; charset=utf-8"),
        "/static/dashboard.js": (STATIC / "dashboard.js", "text/javascript; charset=utf-8"),
        "/static/dashboard.css": (STATIC / "dashboard.css", "text/css; charset=utf-8"),
        "/static/plotly.min.js": (plotly_js(), "text/javascript; charset=utf-8"),
    }

    def serve_file(request: Request) -> Response:
        path, media_type = static[request.url.path]
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})

    def api_config(request: Request) -> JSONResponse:
        return JSONResponse({"folder": str(folder.resolve()), "poll_seconds": poll_seconds})

    def api_runs(request: Request) -> JSONResponse:
        return JSONResponse(overview(folder))

    def api_run(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            body = run_detail(folder, params.get("source", "."), params.get("run", ""), params.get("since"))
        except StoreUnreadable as exc:
            body = {"error": str(exc)}
        return JSONResponse(body)

    routes = [Route(path, serve_file) for path in static]
    routes += [Route("/api/config", api_config), Route("/api/runs", api_runs), Route("/api/run", api_run)]
    return Starlette(routes=routes)


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard until interrupted (Ctrl-C)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made after the URL is printed wait for uvicorn, never refused
    shown = f"[{host}]" if ":" in host else host
    print(f"fedir dashboard on http://{shown}:{sock.getsockname()[1]}/ over {Path(folder).resolve()}"
          " (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(create_app(folder), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
