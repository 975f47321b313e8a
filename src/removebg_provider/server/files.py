"""A private directory of output images that each expire a fixed time after they were written."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from removebg_provider.errors import ConfigurationError

log = logging.getLogger(__name__)

Clock = Callable[[], float]

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}

# The only names this store ever writes: finished files and their partial writes. Anything else in
# the folder (the user's files, other programs' `.part` files) is never served, swept or touched.
_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")
_PARTIAL = re.compile(r"^\.[0-9a-f]{32}\.(png|jpg|webp)\.part$")


class FileStore:
    """Stores output files under random names and forgets them `ttl_seconds` after writing.

    `directory=None` makes a fresh private folder (0700, under the system temp dir) that `close`
    removes; a given directory is created 0700 when missing and refused when another user owns it or
    others may write to it, because whoever can write there can plant a symlink for `/files/` to serve.
    The write time is the file's mtime, set from `clock`, so expiry survives a server restart and
    tests can move time forward with a fake clock instead of sleeping.
    """

    def __init__(self, directory: Path | None, ttl_seconds: float, clock: Clock = time.time) -> None:
        self.temporary = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="removebg-server-")) if directory is None else _own_folder(directory)
        )
        self.ttl_seconds = ttl_seconds
        self._clock = clock

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

        Only a regular file is served, never a symlink (or anything else) found under a valid name.
        An expired file is deleted on the spot, so it is gone from disk as soon as it stops being served.
        """
        if not _NAME.match(name):
            return None
        path = self.directory / name
        written = _regular_file_mtime(path)
        if written is None:
            return None
        if self._expired(written):
            _unlink(path)
            return None
        return path

    def sweep(self) -> int:
        """Delete every expired file this store wrote (and its abandoned partial writes); return how many."""
        removed = 0
        for path in self.directory.iterdir():
            if not (_NAME.match(path.name) or _PARTIAL.match(path.name)):
                continue
            written = _regular_file_mtime(path)
            if written is not None and self._expired(written) and _unlink(path):
                removed += 1
        if removed:
            log.info("removed %d expired output file(s) from %s", removed, self.directory)
        return removed

    def close(self) -> None:
        """Remove the folder with its files if this store made it (`directory=None`); else keep it."""
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _expired(self, written: float) -> bool:
        return self._clock() >= written + self.ttl_seconds


def _own_folder(directory: Path) -> Path:
    """`directory`, created 0700 if missing, or a `ConfigurationError` if it is not safely ours."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigurationError(f"cannot create the storage folder {directory}: {error.strerror}") from error
    try:
        # lstat too: a symlink in a shared folder such as /tmp is only as safe as its owner.
        link, info = directory.lstat(), directory.stat()
    except OSError as error:
        raise ConfigurationError(f"cannot use the storage folder {directory}: {error.strerror}") from error
    me = os.geteuid()
    for owner in (link.st_uid, info.st_uid):
        if owner != me:
            raise ConfigurationError(
                f"refusing the storage folder {directory}: it belongs to uid {owner}, not to this "
                f"user (uid {me}); pass a folder of your own with --storage"
            )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"refusing the storage folder {directory}: it is not a directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(
            f"refusing the storage folder {directory}: others may write to it (mode "
            f"{stat.S_IMODE(info.st_mode):o}); run 'chmod go-w {directory}' or pass another folder"
        )
    return directory


def _regular_file_mtime(path: Path) -> float | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    return info.st_mtime if stat.S_ISREG(info.st_mode) else None


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
