"""Modes for files dpolab writes through `tempfile` (which creates 0600 files / 0700 folders).

Atomic writers create a temporary file and rename it; the result must be readable like any
file the user writes (0644 / 0755 under the usual umask 022), so others sharing the run
folder or cache can read weights, reports and caches.
"""

import contextlib
import os
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()


def umask() -> int:
    with _lock:  # os.umask can only be read by setting it: keep that window closed to other threads
        current = os.umask(0o022)
        os.umask(current)
    return current


def public(path, folder: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would have: 0666 / 0777 minus the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without
    error, deleted when it raises. A reader never sees a half-written file, and the result has the
    mode of a plain open() (mkstemp's 0600 would hide it from others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        public(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
