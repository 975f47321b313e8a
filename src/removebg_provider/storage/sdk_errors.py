"""What the object-store SDKs raise: failed reads and writes, missing objects; short messages."""

from __future__ import annotations

import threading

# The first call imports the SDKs; threads asking at once wait for it (see `_sdk_errors`).
_FIRST_CALL = threading.Lock()


def storage_errors() -> tuple[type[BaseException], ...]:
    """What the object-store SDKs raise for a failed read or write; they do not all use OSError."""
    return _sdk_errors()[0]


def missing_errors() -> tuple[type[BaseException], ...]:
    """What the SDKs raise for an object that is not there."""
    return _sdk_errors()[1]


def _sdk_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(`storage_errors`, `missing_errors`) with the SDKs installed, imported once.

    Imported under a lock: two threads importing one package at once can see it half initialised
    ("cannot access submodule 'core' of module 'azure'"), and a run's lookup threads all reach
    their first failed read together. Once imported, no lock is taken.
    """
    global _IMPORTED
    # Every write asks; only the first calls take the lock, so 100 threads never queue on it.
    if _IMPORTED is None:
        with _FIRST_CALL:
            if _IMPORTED is None:
                _IMPORTED = _import_sdk_errors()
    return _IMPORTED


_IMPORTED: tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]] | None = None


def _import_sdk_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    # smart_open raises NotImplementedError for a scheme it has no transport for.
    failures: list[type[BaseException]] = [OSError, ValueError, NotImplementedError]
    missing: list[type[BaseException]] = [FileNotFoundError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        failures += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from google.api_core.exceptions import GoogleAPIError, NotFound

        failures.append(GoogleAPIError)
        missing.append(NotFound)
    except ImportError:
        pass
    try:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        failures.append(AzureError)
        missing.append(ResourceNotFoundError)
    except ImportError:
        pass
    return tuple(failures), tuple(missing)


def says_missing(exc: BaseException) -> bool:
    """Whether an SDK error, or the one it was raised from, says the object is not there.

    By the error's type or S3's error code, never by its text, which names the object (a key may
    hold "404"). smart_open raises OSError from botocore's NoSuchKey.
    """
    return any(
        isinstance(error, missing_errors()) or error_code(error) in ("NoSuchKey", "404")
        for error in (exc, exc.__cause__)
        if error is not None
    )


def error_code(exc: BaseException) -> str:
    """The error code of a botocore ClientError ("NoSuchKey", "PreconditionFailed"...); "" for others."""
    # botocore's ClientError carries a dict; other SDKs' `response` is an HTTP response.
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def looks_missing(exc: BaseException) -> bool:
    """Whether an SDK error that is not one of `missing_errors` still says the object is not there."""
    text = str(exc).lower()
    return any(
        marker in text for marker in ("404", "not found", "nosuchkey", "does not exist", "blobnotfound")
    )


def short_error(exc: BaseException) -> str:
    """An SDK error in at most 300 characters, for messages that name the object."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
