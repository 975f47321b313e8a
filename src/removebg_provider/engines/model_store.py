"""The model cache: where named model files live, and resumable, verified downloads into it.

A download goes to `<file>.part` and resumes from there (HTTP Range) after a cut, in the same call
or the next one; the file takes its final name only once its checksum matches the table in
`presets`, and a download whose checksum differs is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from removebg_provider.engines.presets import PRESETS, ModelPreset
from removebg_provider.errors import RemoveBgError

log = logging.getLogger(__name__)

MODEL_HOME_ENV = "REMOVEBG_MODEL_HOME"
MIRROR_ENV = "REMOVEBG_MODEL_MIRROR"

# Called with (bytes in the file so far, expected total or None) as a download advances.
DownloadProgress = Callable[[int, int | None], None]

_CHUNK_BYTES = 1 << 20  # for hashing
# Bytes read per step of a download; a cut loses at most the step under way (urllib3 drops it).
_READ_BYTES = 1 << 16
_TIMEOUT_SECONDS = (10.0, 60.0)  # connect, and each read
# A connection cut mid-body is resumed at once, this many times in one call; what was received
# stays in the .part file for the next call.
_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class ResolvedModel:
    """A model to load: its file, and the preset named by the user (None for a bare path)."""

    path: Path
    preset: str | None


def model_home(override: str | Path | None = None) -> Path:
    """The model cache: `override`, else $REMOVEBG_MODEL_HOME, else $XDG_CACHE_HOME/removebg/models,
    else ~/.cache/removebg/models."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(MODEL_HOME_ENV):
        return Path(os.environ[MODEL_HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "removebg" / "models"


def named_preset(name: str) -> ModelPreset:
    """The preset called `name`, or an error listing the names there are."""
    if name not in PRESETS:
        raise RemoveBgError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def cached_path(name: str, home: Path) -> Path:
    """Where the model called `name` is, or will be, in the cache at `home`."""
    return home / named_preset(name).file_name


def resolve_model(model: str, home: Path) -> ResolvedModel:
    """`model` as a file to load: a known name (which must be in the cache) or the path of a file."""
    if model not in PRESETS:
        path = Path(model).expanduser()
        if not path.exists():
            raise RemoveBgError(
                f"model {model!r} is neither a file nor a model name; names: {', '.join(PRESETS)}"
            )
        return ResolvedModel(path, None)
    preset = PRESETS[model]
    path = home / preset.file_name
    if not path.is_file():
        how = (
            f"run `removebg models pull {model}` or add --pull"
            if preset.url
            else f"it has no public download: pass the path of your file with --model-preset {model}"
        )
        raise RemoveBgError(f"model {model!r} is not downloaded ({path} does not exist); {how}")
    return ResolvedModel(path, model)


def pull(
    name: str,
    home: Path,
    on_progress: DownloadProgress | None = None,
    mirror: str | None = None,
) -> Path:
    """Make sure the model called `name` is in the cache at `home`, verified; return its path.

    A file already there is verified, not downloaded again. `mirror` (default: $REMOVEBG_MODEL_MIRROR)
    is a base URL to fetch the file from under the name it has in its public URL.
    """
    preset = named_preset(name)
    if preset.url is None or preset.checksum is None:
        raise RemoveBgError(
            f"model {name!r} has no public download; pass the path of your own file with "
            f"--model PATH --model-preset {name}"
        )
    target = home / preset.file_name
    mirror = mirror or os.environ.get(MIRROR_ENV)
    url = f"{mirror.rstrip('/')}/{preset.url.rsplit('/', 1)[-1]}" if mirror else preset.url
    if target.is_file():
        algorithm, expected = _split_checksum(preset.checksum)
        actual = file_digest(target, algorithm)
        if actual != expected:
            raise RemoveBgError(
                f"{target} is already there but its {algorithm} is {actual}, not {expected}: "
                f"delete it and pull {name} again"
            )
        return target
    home.mkdir(parents=True, exist_ok=True)
    return download(url, preset.checksum, target, on_progress)


def download(url: str, checksum: str, target: Path, on_progress: DownloadProgress | None = None) -> Path:
    """Download `url` to `target` through `<target>.part`, resuming after cuts; verify `checksum`.

    `checksum` is "<algorithm>:<hex digest>" (any hashlib algorithm, e.g. md5 or sha256). On a
    mismatch the partial file is deleted and nothing is left at `target`.
    """
    algorithm, expected = _split_checksum(checksum)
    part = target.with_name(target.name + ".part")
    for _attempt in range(_MAX_ATTEMPTS):
        try:
            _fetch_into(url, part, on_progress)
            break
        except _BodyCut:
            log.info("connection to %s cut after %d bytes; resuming", url, part.stat().st_size)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RemoveBgError(_unreachable_message(url, target, checksum, exc)) from exc
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "error"
            raise RemoveBgError(
                f"cannot download {url}: HTTP {status}; {_by_hand(target, checksum)}"
            ) from exc
    else:
        raise RemoveBgError(
            f"the connection to {url} kept breaking ({_MAX_ATTEMPTS} attempts); what arrived is kept in "
            f"{part}: run the same command again to resume"
        )
    actual = file_digest(part, algorithm)
    if actual != expected:
        part.unlink()
        raise RemoveBgError(
            f"the file downloaded from {url} has {algorithm} {actual}, not {expected}; it was deleted. "
            "Try again; if it keeps happening the file at that address has changed"
        )
    os.replace(part, target)
    return target


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of the file at `path` with the hashlib `algorithm`."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_into(url: str, part: Path, on_progress: DownloadProgress | None) -> None:
    """One attempt: append to `part` what the server has past its current size, or start over.

    Raises `_BodyCut` when the connection breaks during the body. HTTP 416 to a resume means the
    part is already as long as the file: it is left for the checksum to judge.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=_TIMEOUT_SECONDS) as response:
        if offset and response.status_code == 416:
            return
        response.raise_for_status()
        resumed = response.status_code == 206 and response.headers.get("Content-Range", "").startswith(
            f"bytes {offset}-"
        )
        done = offset if resumed else 0  # a server that ignores Range sends the whole file
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        with part.open("ab" if resumed else "wb") as stream:
            try:
                for chunk in response.iter_content(_READ_BYTES):
                    stream.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                raise _BodyCut(url) from exc


class _BodyCut(Exception):
    """The connection broke while the body was arriving; what was written to the part is kept."""


def _split_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in hashlib.algorithms_available or not expected:
        raise RemoveBgError(f"checksum {checksum!r} is not '<algorithm>:<hex digest>'")
    return algorithm, expected.lower()


def _unreachable_message(url: str, target: Path, checksum: str, error: Exception) -> str:
    # requests wraps urllib3's wrapper of the OSError; its "[Errno N] reason" is what a person needs.
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    reason = found.group(1).strip() if found else type(error).__name__
    return f"cannot download {url} ({reason}); offline? {_by_hand(target, checksum)}"


def _by_hand(target: Path, checksum: str) -> str:
    return (
        f"download it by hand and place it at {target} ({checksum}); "
        "`removebg models pull` verifies a file placed there"
    )
