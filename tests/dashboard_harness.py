"""The dashboard served in a background thread, and Debian's chromium driven by Playwright.

Shared by the browser tests and the load-time benchmark. Playwright's own browser download
cannot work on these machines, so it drives ``/usr/bin/chromium`` (Debian's package, which
``make test`` installs), headless, with every background connection switched off: the
page must load with nothing from the internet.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from fedir.server.dashboard import create_app

CHROMIUM = os.environ.get("FEDIR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("FEDIR_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@contextmanager
def served(folder: Path, poll_seconds: float = 0.5) -> Iterator[str]:
    """The dashboard over ``folder`` on a free loopback port; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(folder, poll_seconds), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:  # however long a loaded machine takes, unless the server died
        if not thread.is_alive():
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Debian chromium under Playwright (the Browser object)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: object, name: str) -> Path:
    """Save a full-page PNG under ARTIFACTS and say where (pytest -s shows it; the path is stable)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
