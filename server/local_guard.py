"""Who on the coordinator's own machine may reach the SuperLink: `fedir guard`.

The SuperLink listens on loopback only (DEPLOY.md, step 3), and the front door (nginx,
fedir.server.fleet_proxy) passes hospitals the Fleet API routes alone. But Flower 1.41 serves
every API, the Control API that starts runs and pushes code to the hospitals included, on that
one loopback port (`--host`/`--port`; a Unix socket is refused: "Address (unix:...) cannot be
parsed"), and its open-source SuperLink has no account authentication: any local account
could list runs or submit one. What the operating system does allow is a firewall rule that
matches the local user who opens the connection (netfilter's `owner` match). `fedir guard`
writes those rules: a chain of its own, jumped to for TCP to the SuperLink's loopback port,
that accepts the listed accounts (the operator who runs `flwr`, the SuperLink's and
ServerApp's account, nginx's worker user) and rejects every other with a TCP reset.

It guards the connection, not the message: an allowed account can do everything the Control
API offers, and root can remove the rules. Rules do not survive a reboot unless the
distribution's iptables-persistent (or the equivalent) saves them.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
from collections.abc import Sequence

from fedir.errors import UserError

LOOPBACK = "127.0.0.1"


class GuardError(UserError, RuntimeError):
    """An unknown account, a missing iptables, or rules that could not be applied."""


def chain_name(port: int) -> str:
    """One chain per guarded port, so that `--remove` takes away exactly what was added."""
    return f"FEDIR-SUPERLINK-{port}"


def _uid(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise GuardError(f"no local account {user!r}: list the accounts that run flwr, the SuperLink and nginx") from None


def _jump(port: int) -> list[str]:
    return ["OUTPUT", "-o", "lo", "-p", "tcp", "-d", LOOPBACK, "--dport", str(port), "-j", chain_name(port)]


def guard_commands(port: int, users: Sequence[str]) -> list[list[str]]:
    """The iptables commands that let only `users` open TCP connections to LOOPBACK:port."""
    if not users:
        raise GuardError("give at least one --allow account (the operator's, the SuperLink's, nginx's)")
    if not 0 < port < 65536:
        raise GuardError(f"port {port} is not a TCP port")
    chain = chain_name(port)
    commands = [["iptables", "-N", chain]]
    for user in users:
        commands.append(["iptables", "-A", chain, "-m", "owner", "--uid-owner", str(_uid(user)), "-j", "ACCEPT"])
    commands.append(["iptables", "-A", chain, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
    commands.append(["iptables", "-I", *_jump(port)])
    return commands


def unguard_commands(port: int) -> list[list[str]]:
    """The iptables commands that take away what guard_commands added for `port`."""
    chain = chain_name(port)
    return [["iptables", "-D", *_jump(port)], ["iptables", "-F", chain], ["iptables", "-X", chain]]


def apply(commands: Sequence[Sequence[str]]) -> None:
    """Run `commands` in order; GuardError with iptables' own message on the first failure."""
    if shutil.which("iptables") is None:
        raise GuardError("iptables is not installed (apt-get install iptables), or run with --print and apply the "
                         "rules with your firewall's own tools")
    for command in commands:
        done = subprocess.run(list(command), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GuardError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.returncode}")
