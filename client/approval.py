"""The site's allow-list of approved apps: which exact bundles its IT let run.

A SuperNode runs whatever Flower App Bundle (FAB) the coordinator submits, and the
ClientApp's code comes from that bundle. The only name a bundle carries that the
coordinator cannot forge is its content: the FAB is a zip that Flower builds
deterministically (sorted files, a fixed date), and the SuperNode receives it with its
sha256 (`fab_hash`). So an approval is that digest, computed here with Flower's own
builder (`flwr.cli.build.build_fab_from_disk`, what `flwr run APP_DIR` submits) from
the copy of the app the site reviewed. The gate (fedir.client.app_gate) compares the
digest of every bundle that arrives with this list before Flower stores it.

The list is a JSON file the site owns: `{"approved": [{"sha256", "app", "approved_at",
"note", "source"}, ...]}`. It is read again for every new run, so an approval or a
removed entry takes effect without restarting the SuperNode; a missing file approves
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import get_fab_metadata

from fedir.errors import UserError


class ApprovalError(UserError):
    """The app folder or the allow-list cannot be used; the message says why."""


@dataclass(frozen=True)
class Approval:
    """One approved bundle: its digest, what it calls itself, when and why it was approved."""

    sha256: str
    app: str
    approved_at: str
    note: str
    source: str


def fab_bytes(app_dir: Path) -> bytes:
    """The bundle `flwr run APP_DIR` would submit, built by Flower's own code."""
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise ApprovalError(f"{app_dir} is not a Flower app: it has no pyproject.toml")
    try:
        return build_fab_from_disk(Path(app_dir))
    except (ValueError, OSError) as exc:
        raise ApprovalError(f"Flower cannot build a bundle from {app_dir}: {exc}") from exc


def fab_digest(content: bytes) -> str:
    """The sha256 a SuperNode knows the bundle by (Flower's `fab_hash`)."""
    return hashlib.sha256(content).hexdigest()


def fab_name(content: bytes) -> str:
    """'<fab id> <version>' from the bundle's pyproject.toml (read as data, never run)."""
    fab_id, version = get_fab_metadata(content)
    return f"{fab_id} {version}"


def read_allow_list(path: Path) -> list[Approval]:
    """Every approval in the file, oldest first; a missing file approves nothing."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ApprovalError(f"the allow-list {path} cannot be read: {exc}") from exc
    try:
        return [Approval(**entry) for entry in json.loads(text)["approved"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApprovalError(f"the allow-list {path} is not a fedir allow-list: {exc!r}") from exc


def find_approval(digest: str, path: Path) -> Approval | None:
    """The approval of this exact digest, or None."""
    return next((a for a in read_allow_list(path) if a.sha256 == digest), None)


def approve(app_dir: Path, path: Path, note: str = "") -> tuple[Approval, bool]:
    """Record the bundle built from app_dir as approved; (approval, False) if it already was."""
    content = fab_bytes(app_dir)
    digest = fab_digest(content)
    approvals = read_allow_list(path)
    if (existing := next((a for a in approvals if a.sha256 == digest), None)) is not None:
        return existing, False
    approval = Approval(sha256=digest, app=fab_name(content),
                        approved_at=datetime.now(UTC).isoformat(timespec="seconds"),
                        note=note, source=str(Path(app_dir).resolve()))
    _write(path, [*approvals, approval])
    return approval, True


def _write(path: Path, approvals: list[Approval]) -> None:
    """Replace the file in one step, so a SuperNode reading it never sees half a list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"approved": [asdict(a) for a in approvals]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
