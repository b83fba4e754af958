"""Upload files on disk, one private folder per Streamlit session, deleted when the session ends.

Layout: ``<root>/<server pid>/<session id>/``, all ``0700``. Streamlit has no session-end callback, so a janitor
thread (one per server process) sweeps every ``SWEEP_S`` seconds:

* a session the Streamlit runtime no longer lists as active (tab closed, browser gone) loses its folder once
  it has been inactive for ``GONE_GRACE_S``;
* where there is no runtime to ask (``AppTest``, bare runs), a folder unused for ``idle_s`` is deleted;
* folders of server processes that are gone (a crash, a restart) are deleted whole.

A session that reconnects after its folder went (a network drop longer than the grace) stages its upload again
from memory (``app.session.staged``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

log = logging.getLogger("medseg.app")

SWEEP_S = 15.0
GONE_GRACE_S = 45.0
DEFAULT_IDLE_S = 3600.0

ActiveCheck = Callable[[str], bool]


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / f"medseg-app-uploads-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask, and the folder may predate this process
    return path


def process_root(root: Path) -> Path:
    """This server process's folder under ``root``."""
    _private_dir(root)
    return _private_dir(root / str(os.getpid()))


def session_folder(root: Path, session_id: str) -> Path:
    """The private folder of one session (created, and marked as used now). Streamlit's ids are UUIDs; any
    other id is percent-encoded into one safe folder name."""
    folder = _private_dir(process_root(root) / quote(session_id, safe="")[:200])
    os.utime(folder)
    return folder


def streamlit_active_check() -> ActiveCheck | None:
    """``Runtime.is_active_session`` of the running Streamlit server (thread-safe), or None without one."""
    try:
        from streamlit.runtime import Runtime
    except ImportError:
        return None
    return Runtime.instance().is_active_session if Runtime.exists() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path, is_active: ActiveCheck | None, idle_s: float, now: float | None = None) -> list[str]:
    """Delete the folders of ended sessions and of dead server processes; returns what was deleted."""
    now = time.time() if now is None else now
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for process in root.iterdir():
        if not process.name.isdigit():
            continue
        if int(process.name) != os.getpid():
            if not _process_alive(int(process.name)):
                shutil.rmtree(process, ignore_errors=True)
                removed.append(process.name)
            continue
        for folder in process.iterdir():
            with contextlib.suppress(FileNotFoundError):  # a session ending at this moment removed it itself
                if is_active is not None and is_active(unquote(folder.name)):
                    os.utime(folder)  # last seen active now: the grace below counts from here
                    continue
                limit = GONE_GRACE_S if is_active is not None else idle_s
                if now - folder.stat().st_mtime > limit:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
    if removed:
        log.info("deleted the upload folders of %d ended session(s)", len(removed))
    return removed


class Janitor:
    """The sweeping thread (daemon): ``start()`` once per server process (``app.page`` does, via cache_resource)."""

    def __init__(self, root: Path, idle_s: float = DEFAULT_IDLE_S, interval_s: float = SWEEP_S):
        self.root, self.idle_s, self.interval_s = root, idle_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medseg-upload-janitor", daemon=True)

    def start(self) -> Janitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                sweep(self.root, streamlit_active_check(), self.idle_s)
            except OSError as e:  # a folder removed under us, a full disk: try again next time
                log.warning("upload janitor: %s", type(e).__name__)
            if self._stop.wait(self.interval_s):
                return
