"""`fedir guard`: only the listed local accounts reach the SuperLink's loopback port.

The rules are real netfilter rules, so the test needs root and iptables (CI runs as root
with iptables installed by `make firewall`); it guards a port of its own and always removes
its rules."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from fedir.cli import main
from fedir.server.local_guard import chain_name, guard_commands

SYSTEM_PYTHON = "/usr/bin/python3"
CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).close()
    print("connected")
except OSError as exc:
    print("refused", exc)
"""


def test_the_rules_accept_each_listed_account_then_reset_the_rest():
    commands = guard_commands(8000, ["root"])
    assert commands[0] == ["iptables", "-N", chain_name(8000)]
    assert ["-m", "owner", "--uid-owner", "0", "-j", "ACCEPT"] == commands[1][3:]
    assert commands[-2][-4:] == ["-j", "REJECT", "--reject-with", "tcp-reset"]
    assert commands[-1][:3] == ["iptables", "-I", "OUTPUT"] and "8000" in commands[-1]


def test_an_unknown_account_is_one_line(capsys):
    assert main(["guard", "8000", "--allow", "no-such-user-here", "--print"]) == 2
    assert "no-such-user-here" in capsys.readouterr().err


def _as(user: str, port: int) -> str:
    """Try to connect to the port as `user` (a fresh interpreter under su)."""
    entry = pwd.getpwnam(user)
    # the system interpreter: another account may not enter the folders of this test's own
    done = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT, str(port)], capture_output=True, text=True, timeout=60,
                          user=entry.pw_uid, group=entry.pw_gid, check=False)
    return done.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None or not Path(SYSTEM_PYTHON).exists(),
                    reason="needs root, iptables (make firewall) and /usr/bin/python3")
def test_a_guarded_port_refuses_an_account_not_listed_and_serves_the_listed_ones(capsys):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert _as("nobody", port) == "connected"  # before: any local account reaches it
        assert main(["guard", str(port), "--allow", "root", "--allow", "daemon"]) == 0
        try:
            assert _as("nobody", port).startswith("refused")
            assert _as("daemon", port) == "connected"
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # root, listed
        finally:
            assert main(["guard", str(port), "--remove"]) == 0
        assert _as("nobody", port) == "connected"
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
        assert chain_name(port) not in rules
    finally:
        stop.set()
        thread.join()
        listener.close()
