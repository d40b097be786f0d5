"""One ServerApp per output folder.

Flower does not stop a ServerApp whose SuperLink went away: after the SuperLink restarts,
the orphaned ServerApp can reconnect and carry on while the operator submits the study
again (DEPLOY.md §8), and two ServerApps would then write the same runs.sqlite, checkpoint
and model.pt. The ServerApp therefore holds an exclusive lock on `OUT/.serverapp.lock` for
as long as it runs; a second one on the same folder is refused with the first one's pid.
The lock is the kernel's (flock): it is released when its process ends, however it ends,
so a crashed ServerApp never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedir.errors import UserError

LOCK_NAME = ".serverapp.lock"


class FolderInUse(UserError):
    """Another live ServerApp holds the output folder."""


@contextmanager
def serverapp_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s ServerApp lock for the block; FolderInUse when another process holds it."""
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUse(
                f"output folder {out_dir} is in use by another ServerApp ({holder}): stop it first "
                "(`flwr stop RUN_ID coordinator`, or end that process on the coordinator), then submit the study again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
