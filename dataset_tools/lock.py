"""One writer per dataset folder: ``<output>/.<name>.lock`` next to ``<output>/<name>/``.

Two conversions writing one folder at once would mix their files (and end in a shape error that
does not say why). The lock file holds the writer's pid, host and start time; a second writer is
refused with one line naming them. A lock left by a process that no longer runs on this host is
taken over (with a log line). The lock sits beside the dataset folder, not in it, so a refused
or failed writer leaves nothing behind (an output folder created only for the lock is removed).
Re-entrant within one process (the CLI takes it before reading the inputs, ``convert`` takes it
again around the writes).
"""
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

log = logging.getLogger(__name__)

_held: Dict[Path, int] = {}  # lock path -> nesting depth in this process
_made_parent: Dict[Path, bool] = {}  # lock path -> the output folder was created to hold it


class OutputLockedError(RuntimeError):
    """Another live process is writing the same dataset folder."""


def lock_path(output, name: str) -> Path:
    return Path(output) / f".{name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
    return True


def _stale(owner: Optional[dict]) -> bool:
    """A lock whose writer is gone: a dead pid on this host (an unreadable lock counts as live)."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _alive(pid)


def acquire(path: Path, activity: str = "conversion is writing this dataset folder"):
    _made_parent[path] = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    if _try_create(path):
        return
    owner = _read_owner(path)
    if _stale(owner):
        log.warning("%s: taking over the lock of pid %s (no longer running)", path, owner["pid"])
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if _try_create(path):
            return
        owner = _read_owner(path)
    _release_parent(path)
    who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner
           else "owner unreadable")
    raise OutputLockedError(
        f"{path.parent / path.name[1:-5]}: another {activity} ({who}); "
        f"wait for it to finish, or delete {path} if that process is gone")


def _release_parent(path: Path):
    """Remove the output folder again if this lock created it and nothing else was written there."""
    if _made_parent.pop(path, False):
        with contextlib.suppress(OSError):
            path.parent.rmdir()


@contextlib.contextmanager
def output_lock(output, name: str, activity: str = "conversion is writing this dataset folder") -> Iterator[Path]:
    """Hold the lock of ``<output>/<name>`` for the duration of the block (``activity``: what a refused writer is told)."""
    path = lock_path(output, name).resolve()
    if _held.get(path):
        _held[path] += 1
    else:
        acquire(path, activity)
        _held[path] = 1
    try:
        yield path
    finally:
        _held[path] -= 1
        if not _held[path]:
            del _held[path]
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _release_parent(path)
