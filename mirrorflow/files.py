"""Files that only their owner may read."""

from __future__ import annotations

import os
from pathlib import Path


def create_owner_only(path: Path) -> None:
    """Create ``path`` (and its folder) readable by its owner only, if missing.

    An existing file is narrowed to the owner too; an existing folder is left
    as it is, since it may hold other things. SQLite gives the ``-wal`` and
    ``-shm`` files it adds beside a database the database's own mode, so
    calling this before opening one keeps them private as well.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
