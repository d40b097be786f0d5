"""One ServerApp per output folder (fedir.server.run_lock): a second is refused with the
first one's pid, and a holder that dies, however it dies, frees the folder."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedir.config import Settings
from fedir.errors import UserError
from fedir.server.run_lock import LOCK_NAME, FolderInUse, serverapp_lock
from fedir.server.server_app import run_study

HOLD = """
import sys, time
from pathlib import Path
from fedir.server.run_lock import serverapp_lock
with serverapp_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"  # waits on the event itself
    return proc


def test_a_second_serverapp_on_the_folder_is_refused_before_it_touches_the_store(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=f"pid {proc.pid}") as err:
            run_study(None, Settings(), tmp_path, "scenario")  # type: ignore[arg-type]
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
        assert not (tmp_path / "runs.sqlite").exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_frees_the_folder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with serverapp_lock(tmp_path):  # no stale lock after a crash
        assert "pid" in (tmp_path / LOCK_NAME).read_text()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    assert (tmp_path / LOCK_NAME).stat().st_mode & 0o077 == 0


def test_the_same_process_cannot_hold_it_twice(tmp_path: Path) -> None:
    with serverapp_lock(tmp_path):
        with pytest.raises(FolderInUse):
            with serverapp_lock(tmp_path):
                pass
