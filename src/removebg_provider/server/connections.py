"""Bound the server's connections: how many may be open, and how long one may take to send a request.

uvicorn on its own keeps a connection that never completes its request head open for ever (its
keep-alive timer starts only after a response, and any byte received stops it), so 21,000 half-open
sockets used up the descriptor limit and `/health` failed. uvicorn's `limit_concurrency` does not help:
it counts those sockets too and answers every real request 503 once they reach it, `/health`
included. This module therefore runs uvicorn's h11 protocol with two rules of its own:

* a connection must deliver a complete request head within `header_timeout_seconds` of opening, or of
  its previous response on a kept-alive connection, or it is closed;
* at most `max_connections` are open. A new connection at the limit closes the one that has waited
  longest for a request head; a request being received or processed is never cut. Only when every
  connection is busy with a request is the newcomer closed instead.

So sockets that never finish a request cannot crowd out the ones that do: a fresh connection to
`/health` is answered however many half-open sockets there are. h11 (uvicorn's own dependency) is
used rather than httptools so the same code runs wherever uvicorn does; it also caps a request head
at 16 KiB.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from removebg_provider.errors import ConfigurationError
from removebg_provider.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Descriptors the server needs besides its connections: output files, `_url` fetches (a socket and
# the deadline watchdog's duplicate per admitted record), the engine, logs.
_DESCRIPTORS_PER_ADMITTED_RECORD = 2
_DESCRIPTORS_RESERVED = 64
_WARNING_INTERVAL_SECONDS = 60.0


def server_config(app: Any, settings: ServerSettings, **uvicorn_options: Any) -> uvicorn.Config:
    """The uvicorn configuration that serves `app` within the connection limits of `settings`.

    `uvicorn_options` are passed on (host, port, log_level, ...).
    """
    return uvicorn.Config(
        app,
        http=_guarded_protocol(_ConnectionGuard(settings.max_connections, settings.header_timeout_seconds)),
        timeout_keep_alive=settings.keep_alive_seconds,
        **uvicorn_options,
    )


def ensure_descriptor_room(settings: ServerSettings) -> int:
    """Raise this process's soft open-file limit so `settings` fit; return the limit now in force.

    Raises `ConfigurationError` when even the hard limit is too low for `max_connections`.
    """
    needed = (
        settings.max_connections
        + _DESCRIPTORS_PER_ADMITTED_RECORD * settings.queue_records
        + _DESCRIPTORS_RESERVED
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigurationError(
            f"--max-connections {settings.max_connections} needs {needed} open files, but this process "
            f"may open at most {hard} (ulimit -Hn); lower --max-connections or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


class _ConnectionGuard:
    """The open connections of one server, and which of them are waiting for a request head."""

    def __init__(self, max_connections: int, header_timeout_seconds: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_seconds = header_timeout_seconds
        self.open: set[_GuardedH11Protocol] = set()
        # Insertion order is the order they started waiting: the first is the one to close for room.
        self.waiting: dict[_GuardedH11Protocol, None] = {}
        self._closed_for_room = 0
        self._warned_at = -_WARNING_INTERVAL_SECONDS

    def admit(self, connection: _GuardedH11Protocol) -> bool:
        """Count `connection` in, closing the longest-waiting one if the limit is reached; False if full."""
        if len(self.open) >= self.max_connections:
            oldest = next(iter(self.waiting), None)
            if oldest is None:
                self._warn("every connection is busy with a request: refused a new one")
                return False
            self.forget(oldest)
            oldest.transport.close()
            self._closed_for_room += 1
            self._warn("closed the connection that had waited longest for a request head")
        self.open.add(connection)
        return True

    def forget(self, connection: _GuardedH11Protocol) -> None:
        self.open.discard(connection)
        self.waiting.pop(connection, None)

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            log.warning(
                "%d connections open, the limit (--max-connections): %s (%d closed for room so far)",
                self.max_connections,
                what,
                self._closed_for_room,
            )


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, admitted by a `_ConnectionGuard` and timed while it waits for a head."""

    guard: ClassVar[_ConnectionGuard]
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.close()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Still (or again) before a request head; the deadline runs from when waiting began.
            if self._head_timer is None and not self.transport.is_closing():
                self._await_head()
        else:
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self.guard.forget(self)
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_waiting()
        self.guard.waiting[self] = None
        self._head_timer = self.loop.call_later(self.guard.header_timeout_seconds, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.guard.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.guard.waiting.pop(self, None)
            self.transport.close()


def _guarded_protocol(guard: _ConnectionGuard) -> type[_GuardedH11Protocol]:
    """A protocol class bound to `guard` (uvicorn builds protocols from a class, one per connection)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"guard": guard})
