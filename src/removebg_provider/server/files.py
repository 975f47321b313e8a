"""A directory of output images that each expire a fixed time after they were written."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

Clock = Callable[[], float]

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}

_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")


class FileStore:
    """Stores output files under random names and forgets them `ttl_seconds` after writing.

    The write time is the file's mtime, set from `clock`, so expiry survives a server restart and
    tests can move time forward with a fake clock instead of sleeping.
    """

    def __init__(self, directory: Path, ttl_seconds: float, clock: Clock = time.time) -> None:
        self.directory = Path(directory)
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        """Write `data` under a fresh name ending in `extension` (png, jpg or webp); return the name."""
        if extension not in MEDIA_TYPES:
            raise ValueError(f"cannot store a .{extension} file; use one of {sorted(MEDIA_TYPES)}")
        name = f"{uuid.uuid4().hex}.{extension}"
        path = self.directory / name
        partial = path.with_name(f".{name}.part")
        partial.write_bytes(data)
        now = self._clock()
        os.utime(partial, (now, now))
        # Readers never see a half-written file: the rename is atomic within one directory.
        partial.replace(path)
        return name

    def open_path(self, name: str) -> Path | None:
        """The path of a live file called `name`, or None when it is unknown, malformed or expired.

        An expired file is deleted on the spot, so it is gone from disk as soon as it stops being served.
        """
        if not _NAME.match(name):
            return None
        path = self.directory / name
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._expired(written):
            _unlink(path)
            return None
        return path

    def sweep(self) -> int:
        """Delete every expired file (and abandoned partial writes); return how many were removed."""
        removed = 0
        for path in self.directory.iterdir():
            if not (_NAME.match(path.name) or path.name.endswith(".part")):
                continue
            try:
                written = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if self._expired(written) and _unlink(path):
                removed += 1
        if removed:
            log.info("removed %d expired output file(s) from %s", removed, self.directory)
        return removed

    def _expired(self, written: float) -> bool:
        return self._clock() >= written + self.ttl_seconds


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
