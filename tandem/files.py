"""Where users' images are kept on disk: readable by this service's user only.

Queued jobs hold the photos people sent. Made with the usual umask, the store's files would be
readable by every user of the machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tandem.files")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# For child processes that write such files themselves (redis-server under `tandem up`).
PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Make the directory, if it is not there, for this user alone. One that exists keeps its
    mode: whoever made it chose it."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> Path:
    """Make the (empty) file, if it is not there, for this user alone. SQLite gives the files it
    keeps beside a database (-wal, -shm) the database file's mode. One that others may read
    (made by an earlier version) is left as it is, and said so."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
    mode = path.stat().st_mode & 0o777
    if mode & ~PRIVATE_FILE:
        log.warning(
            "%s holds users' images and other users may read it (mode %o): chmod 600 it and "
            "the files beside it",
            path,
            mode,
        )
    return path
