"""The package's one error hierarchy; messages name the input that failed, never the token."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # For the annotation only: this module imports nothing of ours at run time.
    from removebg_provider.pipeline import RunSummary


class RemoveBgError(Exception):
    """Base class of every error this package raises on purpose."""


class AuthenticationError(RemoveBgError):
    """The API refused the token (HTTP 401 or 403)."""


class PaymentRequiredError(RemoveBgError):
    """The API refused a whole request with HTTP 402; the message says what the account details say."""


class OutOfCreditsError(PaymentRequiredError):
    """HTTP 402 and the account has fewer credits left than the request's records."""


class ApiRequestError(RemoveBgError):
    """The API rejected a whole request (a 4xx other than 401, 402, 403, 429, or an error body)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class TransientApiError(RemoveBgError):
    """A retryable failure (connection, timeout, 429, 5xx, unreadable body) that outlasted the retries."""


class ManifestError(RemoveBgError):
    """A manifest cannot be read, validated or written."""


class StorageError(RemoveBgError):
    """An object cannot be read from or written to the user's storage."""


class MissingObjectError(StorageError):
    """An object read is not there (a store's miss), as opposed to one that could not be read."""


class BudgetExceededError(RemoveBgError):
    """The run would bill more records than `max_billable_records` allows."""


class CreditsShortError(RemoveBgError):
    """The run would bill more records than the account has credits left (checked before sending)."""


class FailurePolicyError(RemoveBgError):
    """More rows failed than `max_failed_fraction` allows; `summary` holds the counts of the run or shard."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class RunStoppedError(RemoveBgError):
    """A stop was requested (Ctrl-C, SIGTERM, Airflow's `on_kill`): no new request was sent after it.

    Raised once the requests in flight have finished and what was done is stored; `summary` counts
    it (the rows not reached have status 499).
    """

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class CopyError(StorageError):
    """An API output could not be copied into storage; its row shows `status_code` and `status_text`."""

    def __init__(self, status_code: int, message: str, status_text: str = "output copy failed") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.status_text = status_text


class OutputGoneError(CopyError):
    """An output URL answered 403, 404 or 410: the file is gone (or, just after the answer, not yet there)."""


class FetchRefused(RemoveBgError):
    """A URL chosen by someone else was not fetched: not public, too slow, too large, or it failed.

    `code` is the HTTP status that describes why (400, 403 not a public address, 408, 413).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConfigurationError(RemoveBgError, ValueError):
    """An argument, record, option or connection setting is invalid; the message names it and what fits."""
