"""What the object-store SDKs raise: failed reads and writes, missing objects; short messages."""

from __future__ import annotations

import functools


@functools.cache
def storage_errors() -> tuple[type[BaseException], ...]:
    """What the object-store SDKs raise for a failed read or write; they do not all use OSError."""
    # smart_open raises NotImplementedError for a scheme it has no transport for.
    errors: list[type[BaseException]] = [OSError, ValueError, NotImplementedError]
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    try:
        import google.api_core.exceptions

        errors.append(google.api_core.exceptions.GoogleAPIError)
    except ImportError:
        pass
    try:
        import azure.core.exceptions

        errors.append(azure.core.exceptions.AzureError)
    except ImportError:
        pass
    return tuple(errors)


@functools.cache
def missing_errors() -> tuple[type[BaseException], ...]:
    """What the SDKs raise for an object that is not there."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    try:
        import google.api_core.exceptions

        errors.append(google.api_core.exceptions.NotFound)
    except ImportError:
        pass
    try:
        import azure.core.exceptions

        errors.append(azure.core.exceptions.ResourceNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


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
