"""Real Flower deployment processes on 127.0.0.1 for the tests: a TLS SuperLink with
registered-node authentication, SuperNodes, and the `flwr` CLI with its own Flower home
(never the user's). Every process is started in its own session and killed with its
process group, so a failed test leaves nothing running.

Waiting: a test waits for the event itself (a port that listens, a message in a log, the
summary a run writes), for as long as it takes on a loaded machine, and stops waiting
only when the event can no longer happen: the process that would cause it has exited, or
Flower reports the run finished. Polls follow Flower's own pace (`RUN_POLL_S`); the
test's pytest timeout is the only wall-clock bound.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
CONNECTION = "coordinator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) == 0


# The ServerApp's grid pulls replies every 3 s in deployment (flwr.superlink.grid.http_grid),
# so nothing in a run changes faster than that; a SuperNode polls the SuperLink as often.
RUN_POLL_S = 3.0

Unless = Callable[[], "str | None"]  # why the awaited event can no longer happen, or None


def wait_for(event: Callable[[], bool], unless: Unless, poll: float = RUN_POLL_S) -> None:
    """Wait for `event`, however long it takes, unless `unless()` gives a reason it never
    will (then AssertionError with that reason; the event is checked once more first, so
    an event that came just before its cause ended is not missed)."""
    while not event():
        reason = unless()
        if reason is not None:
            if event():
                return
            raise AssertionError(reason)
        time.sleep(poll)


def exited(proc: subprocess.Popen, log: Path) -> Unless:
    """`unless` for an event `proc` would cause: it has exited (its log's tail says why)."""
    def check() -> str | None:
        if proc.poll() is None:
            return None
        return f"{log.stem} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
    return check


def any_of(*checks: Unless) -> Unless:
    return lambda: next((reason for check in checks if (reason := check()) is not None), None)


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, host: str = "127.0.0.1") -> None:
    """Until something listens on host:port, unless `proc` (which should) has exited."""
    wait_for(lambda: port_open(host, port), exited(proc, log), poll=0.2)


def started_run(run: subprocess.CompletedProcess) -> int:
    """The run id `flwr run` printed."""
    found = re.search(r"Successfully started run (\d+)", run.stdout + run.stderr)
    assert found, run.stdout + run.stderr
    return int(found.group(1))


def run_ended(run_id: int, env: dict[str, str], cwd: Path) -> Unless:
    """`unless` for an event of a Flower run: the SuperLink reports the run finished.

    It asks (`flwr ls`, a process of its own) at most every RUN_POLL_S, so that a wait
    polling faster for a cheaper event (a log line) is not slowed by it."""
    asked = [float("-inf")]

    def check() -> str | None:
        if time.monotonic() - asked[0] < RUN_POLL_S:
            return None
        asked[0] = time.monotonic()
        listed = flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, cwd)
        if listed.returncode != 0:
            return f"flwr ls failed: {listed.stdout}{listed.stderr}"
        run = json.loads(listed.stdout)["runs"][0]
        if not run["status"].startswith("finished"):
            return None
        return f"run {run_id} is {run['status']} ({run['status-details']})"
    return check


def wait_for_file(path: Path, run_id: int, env: dict[str, str], cwd: Path) -> None:
    """Until the run's ServerApp has written `path`, unless the run ended without it."""
    wait_for(path.exists, run_ended(run_id, env, cwd))


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while the table was read
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`: the SuperLink's SuperExec and the
    ServerApps it starts run in sessions of their own, out of reach of the SuperLink's group."""
    table = _process_table()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        below = [child for child, (ppid, _) in table.items() if ppid == parent]
        found += [(child, table[child][1]) for child in below]
        todo += below
    return found


def _kill_if_same(pid: int, started: str) -> None:
    """SIGKILL `pid` if it is still the process that started at `started` (not a reused pid)."""
    if _process_table().get(pid, (0, ""))[1] == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Processes:
    """Started processes, stopped together: SIGTERM, then SIGKILL to each process group and
    to every descendant (found before the parents go, while they can still be found)."""

    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with open(self.log(name), "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        below = [pid for proc in self.procs for pid in _descendants(proc.pid)]
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc)  # the group: flwr-clientapp children too
            proc.wait()
        for pid, started in below:
            _kill_if_same(pid, started)


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_flower_config(flwr_home: Path, port: int, ca: Path | None, host: str = "127.0.0.1") -> None:
    """The `flwr` CLI's connection file ($FLWR_HOME/config.toml) naming the coordinator."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ['[superlink]', f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{host}:{port}"']
    if ca is not None:
        lines.append(f'root-certificates = "{ca}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """One `flwr` CLI command; it ends by itself (its connection has Flower's own timeouts)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def superlink_args(certs: Path, port: int, state: Path) -> list[str]:
    return [str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.crt"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(state)]


def supernode_args(certs: Path | None, port: int, key: Path, site_dir: Path, local_port: int,
                   host: str = "127.0.0.1") -> list[str]:
    args = [str(BIN / "flower-supernode"), "--superlink", f"{host}:{port}",
            "--auth-supernode-private-key", str(key),
            "--node-config", f'site-dir="{site_dir}"',
            "--port", str(local_port), "--max-retries", "2", "--max-wait-time", "20"]
    if certs is not None:
        args += ["--root-certificates", str(certs / "ca.crt")]
    return args


NGINX = "/usr/sbin/nginx"


def nginx_args(conf: Path) -> list[str]:
    """nginx in the foreground on fedir's generated config, everything under its folder."""
    prefix = conf.parent
    return [NGINX, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf),
            "-g", "daemon off;"]
