"""A real SMTP server on loopback that records what it receives and misbehaves on request.

`SmtpSink` runs aiosmtpd in a background thread on 127.0.0.1 and an ephemeral
port. Every accepted message is kept as a `ReceivedMessage`. Attributes program
failures; `reset()` forgets messages and programming alike::

    with SmtpSink() as sink:
        sink.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
        transport = SmtpTransport(sink.host, sink.port, security="none")
        ...
        assert sink.messages[0].rcpt_tos == ("ok@example.com",)

Failures it can stage:

- `greeting`: a reply sent instead of the 220 greeting (then it hangs up),
  e.g. ``"421 4.3.2 Service not available"``.
- `mail_reply`, `rcpt_replies` (per address), `data_command_reply` (the reply
  to DATA itself) and `data_reply` (after the message): replies sent instead of
  the usual success (a 2xx `data_reply` still records the message).
  `next_mail_replies` are one-shot replies to the next MAIL commands, used up in
  order before `mail_reply` applies.
- `next_data_replies`: one-shot replies after the next messages, used up in
  order before `data_reply` applies: None accepts as usual, `HANG_UP` hangs up
  without a reply (as `drop_after_data` does once).
- `max_recipients`: the most recipients one transaction takes; RCPT past it is
  answered ``452 4.5.3 Too many recipients`` (RFC 5321 4.5.3.1.10), or
  `too_many_recipients_reply`.
- `drop_after_data`: hang up after reading the message, without a reply (the
  message goes to `dropped`, not `messages`).
- `delays`: seconds to wait before replying, per stage: ``"greeting"``,
  ``"MAIL"``, ``"RCPT"``, ``"DATA"`` (the final reply after the message).
- `credentials=(user, password)`: offer AUTH (PLAIN, LOGIN) without TLS and
  answer 535 to anything else (`auth_attempts` counts tries); with
  `auth_required`, MAIL needs a login first. `auth_reply`: a reply sent to
  every AUTH command instead, e.g. a ``334`` challenge that is not base64.
- `tls_context`: offer STARTTLS with that server context (not offered without);
  `implicit_tls`: speak TLS from the first byte with that context instead.
  `server_tls_context()` builds one from the self-signed certificate that
  aiosmtpd ships for its own tests (CN "aes", no subjectAltName).
- `disconnect_all()`: the server closes every open connection, as an idle
  timeout would.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtpd
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

HOST = "127.0.0.1"
SERVER_HOSTNAME = "sink.localhost"
# Long enough that the client gives up first, short enough to never hang a test run.
_FOREVER = 60.0
# In `next_data_replies`: hang up after the message instead of replying.
HANG_UP = "<hang up>"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
# aiosmtpd's own test certificate: self-signed, CN "aes", valid until 2119.
CERT_DIR = Path(aiosmtpd.__file__).parent / "tests" / "certs"
SERVER_CERT = CERT_DIR / "server.crt"
SERVER_KEY = CERT_DIR / "server.key"


def server_tls_context() -> ssl.SSLContext:
    """A server-side TLS context with aiosmtpd's self-signed test certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(SERVER_CERT, SERVER_KEY)
    return context


def client_tls_context(*, check_hostname: bool = False) -> ssl.SSLContext:
    """A client context that trusts only the test certificate.

    The certificate names "aes", not 127.0.0.1, so host name checking is off
    unless asked for; the chain is verified either way.
    """
    context = ssl.create_default_context(cafile=SERVER_CERT)
    context.check_hostname = check_hostname
    return context


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the sink accepted (or read and then dropped)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    connection: int
    authenticated_as: str | None
    tls: bool

    @property
    def message_id(self) -> str | None:
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        value = parser.parsebytes(self.data).get("Message-ID")
        return None if value is None else str(value).strip()


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the hooks the sink needs around the greeting and hang-up."""

    def __init__(self, handler: _Handler, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sink = sink
        self.connection_no = 0

    async def _handle_client(self) -> None:
        self.connection_no = self.sink._connected(self)
        await self.sink._delay("greeting")
        greeting = self.sink.greeting
        if greeting is not None:
            await self.push(greeting)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_AUTH(self, arg: str) -> None:
        reply = self.sink.auth_reply
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.sink.data_command_reply
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.sink._disconnected(self)


class _Handler:
    """aiosmtpd hooks: each stage answers what the sink is programmed to answer."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: _SinkSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self.sink._delay("MAIL")
        if self.sink.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        one_shot = self.sink._next_mail_reply()
        if one_shot is not None:
            return one_shot
        if self.sink.mail_reply is not None:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: _SinkSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self.sink._delay("RCPT")
        reply = self.sink.rcpt_replies.get(address)
        if reply is not None:
            return reply
        limit = self.sink.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return self.sink.too_many_recipients_reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Any, envelope: Any) -> str:
        auth = session.auth_data if session.authenticated else None
        received = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content),
            mail_options=tuple(envelope.mail_options),
            connection=server.connection_no,
            authenticated_as=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            tls=session.ssl is not None or server.sink.implicit_tls,
        )
        one_shot, reply = self.sink._next_data_reply()
        if self.sink.drop_after_data or (one_shot and reply == HANG_UP):
            self.sink._record(received, dropped=True)
            assert server.transport is not None
            server.transport.close()
            # connection_lost cancels this coroutine; no reply ever goes out.
            await asyncio.sleep(_FOREVER)
        await self.sink._delay("DATA")
        if not one_shot:
            reply = self.sink.data_reply
        if reply is not None and not reply.startswith("2"):
            return reply
        self.sink._record(received, dropped=False)
        return reply or "250 2.0.0 Message accepted"


class _SinkController(Controller):
    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(_Handler(sink), hostname=HOST, port=0, **kwargs)

    def factory(self) -> _SinkSMTP:
        return _SinkSMTP(self.handler, self.sink, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before aiosmtpd's readiness probe uses it.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 (ephemeral port) for tests; see the module docstring."""

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        auth_required: bool = False,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        smtputf8: bool = True,
    ) -> None:
        self.credentials = credentials
        self.auth_required = auth_required
        self.host = HOST
        self.port = 0
        self._lock = threading.Lock()
        self._live: set[_SinkSMTP] = set()
        kwargs: dict[str, Any] = {
            "server_hostname": SERVER_HOSTNAME,
            "enable_SMTPUTF8": smtputf8,
        }
        if credentials is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
        if implicit_tls is not None:
            kwargs["ssl_context"] = implicit_tls
        self.implicit_tls = implicit_tls is not None
        self._controller = _SinkController(self, **kwargs)
        self._started = False
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SmtpSink:
        self._controller.start()
        self._started = True
        self.port = self._controller.port
        # The controller's readiness probe was a connection too; it does not count.
        self._wait(lambda: not self._live, 5.0, "the readiness probe to hang up")
        self.reset()
        return self

    def stop(self) -> None:
        """Close every connection, then the server; idempotent."""
        if not self._started:
            return
        self.disconnect_all(abort=True)
        self._controller.stop()
        self._started = False

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget received messages and counters, and answer normally again."""
        with self._lock:
            self.messages: list[ReceivedMessage] = []
            self.dropped: list[ReceivedMessage] = []
            self.connections = 0
            self.auth_attempts = 0
        self.greeting: str | None = None
        self.mail_reply: str | None = None
        self.next_mail_replies: list[str] = []
        self.rcpt_replies: dict[str, str] = {}
        self.auth_reply: str | None = None
        self.data_command_reply: str | None = None
        self.data_reply: str | None = None
        self.next_data_replies: list[str | None] = []
        self.max_recipients: int | None = None
        self.too_many_recipients_reply = TOO_MANY_RECIPIENTS
        self.drop_after_data = False
        self.delays: dict[str, float] = {}

    def disconnect_all(self, timeout: float = 5.0, *, abort: bool = False) -> None:
        """Close every open connection from the server side and wait until they are gone.

        A TLS connection closes only once the client answers the TLS shutdown;
        `abort=True` drops connections at once instead.
        """
        if abort:
            loop = self._controller.loop
            asyncio.run_coroutine_threadsafe(self._abort_all(), loop).result(timeout)
            return
        with self._lock:
            servers = list(self._live)
        for server in servers:
            if server.transport is not None:
                self._controller.loop.call_soon_threadsafe(server.transport.close)
        self._wait(lambda: not self._live, timeout, "connections to close")

    async def _abort_all(self) -> None:
        with self._lock:
            servers = list(self._live)
            self._live.clear()
        for server in servers:
            # A connection aborted in the middle of a STARTTLS handshake never hears
            # connection_lost (asyncio's SSL layer has not adopted it yet), so both
            # layers are aborted and its handler task is cancelled by hand.
            for transport in (server.transport, getattr(server, "_original_transport", None)):
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
            handler_task = getattr(server, "_handler_coroutine", None)
            if handler_task is not None:
                handler_task.cancel()
        # Let the aborted transports run their connection_lost callbacks (which close
        # the sockets) before the controller stops the loop.
        for _ in range(3):
            await asyncio.sleep(0)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    # -- called from the server thread -----------------------------------------------------

    def _connected(self, server: _SinkSMTP) -> int:
        with self._lock:
            self._live.add(server)
            self.connections += 1
            return self.connections

    def _disconnected(self, server: _SinkSMTP) -> None:
        with self._lock:
            self._live.discard(server)

    def _record(self, message: ReceivedMessage, *, dropped: bool) -> None:
        with self._lock:
            (self.dropped if dropped else self.messages).append(message)

    def _next_mail_reply(self) -> str | None:
        with self._lock:
            return self.next_mail_replies.pop(0) if self.next_mail_replies else None

    def _next_data_reply(self) -> tuple[bool, str | None]:
        """(True, the next one-shot reply after a message), or (False, None) if none is left."""
        with self._lock:
            if self.next_data_replies:
                return True, self.next_data_replies.pop(0)
            return False, None

    async def _delay(self, stage: str) -> None:
        seconds = self.delays.get(stage)
        if seconds:
            await asyncio.sleep(seconds)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        user, password = self.credentials
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        with self._lock:
            self.auth_attempts += 1
        if not ok:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=auth_data)

    # -- helpers ---------------------------------------------------------------------------

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until `count` messages were accepted, and return them."""
        self._wait(lambda: len(self.messages) >= count, timeout, f"{count} message(s)")
        with self._lock:
            return list(self.messages)

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SmtpSink: timed out waiting for {what}")
            time.sleep(0.005)
