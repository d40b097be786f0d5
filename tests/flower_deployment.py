"""Real Flower deployment processes on 127.0.0.1 for the tests: a TLS SuperLink with
registered-node authentication, SuperNodes, and the `flwr` CLI with its own Flower home
(never the user's). Every process is started in its own session and killed with its
process group, so a failed test leaves nothing running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def wait_for_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class Processes:
    """Started processes, stopped together (SIGTERM, then SIGKILL to the process group)."""

    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc)  # the group: flwr-serverapp / flwr-clientapp children too
            proc.wait()


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


def flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


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
