"""Server-side failures that carry the HTTP status code they are reported with."""

from __future__ import annotations

from removebg_provider.errors import RemoveBgError


class ServerError(RemoveBgError):
    """A failure the server reports to its client with `code` and a message meant for that client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestRejected(ServerError):
    """The whole request is refused (401, 400, 402, 413, 429): no record is processed or billed."""


class RecordRejected(ServerError):
    """One record cannot be processed; it gets its own `_status` and the rest of the batch goes on."""
