"""A development SMTP sink: accepts mail on loopback and refuses some of it on purpose.

`DevSink` runs an aiosmtpd server in a background thread on 127.0.0.1 and an
ephemeral port. It keeps no message, only counts. Its rules, by recipient:

- an address whose domain is ``invalid`` or ends in ``.invalid`` (RFC 2606:
  never a real domain) is refused permanently: ``550 5.1.1``;
- an address whose local part starts with ``greylist`` is refused
  transiently the first time the sink sees it (``451 4.7.1``, as a
  greylisting server does) and accepted from then on;
- every other address is accepted.

It exists for `mailoutbox demo`; aiosmtpd comes with the `demo` extra.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GREYLIST_PREFIX = "greylist"
REFUSED_DOMAIN = "invalid"
GREYLIST_REPLY = "451 4.7.1 Greylisted: please try again later"
REFUSED_REPLY = "550 5.1.1 No such domain: the address does not exist"


def is_refused(address: str) -> bool:
    """True if the sink refuses `address` permanently (its domain is .invalid)."""
    domain = address.rpartition("@")[2].lower().rstrip(">")
    return domain == REFUSED_DOMAIN or domain.endswith("." + REFUSED_DOMAIN)


def is_greylisted(address: str) -> bool:
    """True if the sink refuses `address` once (transiently) before accepting it."""
    return address.lstrip("<").lower().startswith(GREYLIST_PREFIX)


@dataclass(frozen=True)
class SinkStats:
    """What the sink has seen so far."""

    messages: int
    recipients_accepted: int
    greylisted: int
    refused: int
    connections: int


class DevSink:
    """An SMTP server on 127.0.0.1 (ephemeral port) with the rules of the module docstring.

    Use as a context manager, or call `start()` and `stop()`; `stop()` closes
    every connection, stops the server's event loop and joins its thread.
    """

    def __init__(self, *, host: str = HOST, hostname: str = "devsink.localhost") -> None:
        self.host = host
        self.hostname = hostname
        self.port = 0
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._live: set[Any] = set()
        self._messages = 0
        self._accepted = 0
        self._greylisted = 0
        self._refused = 0
        self._connections = 0
        self._controller: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> DevSink:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import SMTP
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                'the demo SMTP sink needs aiosmtpd: pip install "mailoutbox[demo]"'
            ) from exc
        if self._controller is not None:
            raise RuntimeError("the sink is already running")
        sink = self

        class _Server(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                with sink._lock:
                    sink._live.add(self)
                    sink._connections += 1
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                try:
                    super().connection_lost(error)
                finally:
                    with sink._lock:
                        sink._live.discard(self)

        class _Controller(Controller):
            def factory(self) -> Any:
                return _Server(self.handler, **self.SMTP_kwargs)

            def _trigger_server(self) -> None:
                # Bound to port 0: learn the real port before aiosmtpd's readiness probe.
                assert isinstance(self.server, asyncio.Server)
                self.port = self.server.sockets[0].getsockname()[1]
                super()._trigger_server()  # type: ignore[no-untyped-call]

        controller = _Controller(
            _Handler(self), hostname=self.host, port=0, server_hostname=self.hostname
        )
        try:
            controller.start()
        except BaseException:
            controller.loop.close()
            raise
        self._controller = controller
        self.port = int(controller.port)
        log.debug("dev SMTP sink listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        """Drop open connections, stop the server and join its thread; idempotent."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        asyncio.run_coroutine_threadsafe(self._abort_all(), controller.loop).result(5.0)
        controller.stop()
        if not controller.loop.is_closed():
            controller.loop.close()

    async def _abort_all(self) -> None:
        with self._lock:
            servers = list(self._live)
            self._live.clear()
        for server in servers:
            if server.transport is not None:
                server.transport.abort()
        # Let the aborted transports run connection_lost before the loop stops.
        for _ in range(3):
            await asyncio.sleep(0)

    def __enter__(self) -> DevSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- bookkeeping (called on the server thread) -----------------------------------------

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(
                self._messages, self._accepted, self._greylisted, self._refused, self._connections
            )

    def _rcpt_reply(self, address: str) -> str | None:
        with self._lock:
            if is_refused(address):
                self._refused += 1
                return REFUSED_REPLY
            key = address.lower()
            if is_greylisted(address) and key not in self._seen:
                self._seen.add(key)
                self._greylisted += 1
                return GREYLIST_REPLY
            self._accepted += 1
            return None

    def _message(self) -> None:
        with self._lock:
            self._messages += 1


class _Handler:
    def __init__(self, sink: DevSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.sink._rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sink._message()
        return "250 2.0.0 Message accepted"


__all__ = ["DevSink", "SinkStats", "is_greylisted", "is_refused"]
