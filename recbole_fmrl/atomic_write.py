"""Atomic file writes: a reader never sees a half-written file that looks complete.

Every writer goes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the target (``os.replace`` is atomic on POSIX and Windows within one volume).
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are ordinary files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(target, text):
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(target, obj):
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npy(target, array):
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
