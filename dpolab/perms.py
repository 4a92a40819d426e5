"""Modes for files dpolab writes through `tempfile` (which creates 0600 files / 0700 folders).

Atomic writers create a temporary file and rename it; the result must be readable like any
file the user writes (0644 / 0755 under the usual umask 022), so others sharing the run
folder or cache can read weights, reports and caches.
"""

import os
import threading

_lock = threading.Lock()


def umask() -> int:
    with _lock:  # os.umask can only be read by setting it: keep that window closed to other threads
        current = os.umask(0o022)
        os.umask(current)
    return current


def public(path, folder: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would have: 0666 / 0777 minus the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())
