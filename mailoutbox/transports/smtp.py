"""SMTP delivery through the standard library's smtplib.

Each worker thread gets its own SMTP session, opened on its first message and
reused for the following ones. The transaction is driven command by command
(MAIL, RCPT, DATA, the message, the final reply) rather than through
`smtplib.SMTP.sendmail`, because where a failure happens decides what it means:
a connection lost before the message's final dot went out is a plain transient
failure, one lost after it is an `UnknownSendOutcome` (the server may have the
message).

Reply classes map to the error tree: 4xx -> TransientSendError, 5xx ->
PermanentSendError (a 535 to AUTH included: the credentials are wrong), each
with the reply code and the RFC 3463 enhanced status code when the server gave
one. Any other reply where a success was due (a 1xx, a 354 to RCPT, a line
without a reply code) is a protocol error: transient, or an
`UnknownSendOutcome` after the message. Refused, reset or timed-out
connections, replies that do not end within the timeout or run past
`_MAX_REPLY_LINES` / `_MAX_REPLY_BYTES` lines / bytes (or have a line past
`_MAX_LINE` bytes), replies smtplib fails to parse (a 334 AUTH challenge that
is not base64), and failed TLS handshakes (certificate errors included, as an
MTA defers them) are transient, or unknown once the message was sent. What
no retry can fix is permanent: STARTTLS required but not offered, AUTH not
offered, SMTPUTF8 needed but not offered, an unusable envelope.

A recipient refused while others are accepted is reported in
`SendResult.refused`, except for a 452: RFC 5321 (4.5.3.1.10) has a server
answer 452 to the recipients past its limit per transaction and the client send
to them in a new one. A 552 there is RFC 821's code for the same limit, which
the RFC asks clients to treat as a 452. So they get the same message in further transactions on
the same session, as long as each delivers to someone; the ones never accepted
end in `refused`. Once a transaction has delivered, nothing after it raises: a
retry of the whole mail would reach its recipients twice, so a later
transaction's failure puts its recipients in `refused` with that failure (the
worker retries the mail for the ones refused with a 4xx alone; see
`DeliveryRules.after_send`).

Server text is cleaned of control characters, of the password (in case a
server echoes it) and cut to `MAX_SERVER_TEXT` characters before it reaches an
exception.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import smtplib
import ssl
import threading
import time
from typing import Any, Literal

from ..errors import (
    PermanentSendError,
    SendError,
    ServerUnavailable,
    TransientSendError,
    UnknownSendOutcome,
)
from .base import Envelope, SendResult

log = logging.getLogger(__name__)

Security = Literal["starttls", "tls", "none"]
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}
# Longest server text kept in an exception; replies can carry whole HTML pages.
MAX_SERVER_TEXT = 1000
# Bound on the QUIT exchange in close(), so closing never waits a full timeout on a dead peer.
_QUIT_TIMEOUT = 5.0
# Bounds on one reply. Real ones (EHLO's the longest) are a few dozen short lines; a
# server going past these is misbehaving, and reading on would let it keep the thread
# and the memory for as long as it likes.
_MAX_REPLY_LINES = 100
_MAX_REPLY_BYTES = 64 * 1024
# smtplib's limit on one reply line (its private `_MAXLINE`), for the same check.
_MAX_LINE = 8192
# RCPT replies meaning "past this transaction's recipient limit" when other recipients
# were accepted: 452, and 552 as RFC 821 had it (RFC 5321 4.5.3.1.10). A 552 about a
# full mailbox gets the same 552 in the new transaction, and ends as a refusal.
_OVER_THE_LIMIT = (452, 552)


def _over_the_limit(replies: dict[str, tuple[int, str]]) -> list[str]:
    """The recipients a transaction refused for being past the server's limit."""
    return [recipient for recipient, (code, _) in replies.items() if code in _OVER_THE_LIMIT]


# RFC 3463: class.subject.detail at the start of the reply text; the class repeats the
# first digit of the reply code (RFC 2034), which is how a stray number is told apart.
_ENHANCED_CODE = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# Any line break, so a bare LF or CR cannot end the DATA section early (SMTP smuggling)
# and every line reaches the server with the CRLF that RFC 5321 requires.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_CONNECT = "connect"
_GREETING = "greeting"
_EHLO = "EHLO"
_STARTTLS = "STARTTLS"
_AUTH = "AUTH"
_MAIL = "MAIL FROM"
_RCPT = "RCPT TO"
_DATA = "DATA"
_MESSAGE = "sending the message"
_FINAL_REPLY = "end of DATA"
_RSET = "RSET"


class _Secret:
    """Holds the password so that no repr, vars() dump or log line shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"


class _StaleConnection(Exception):
    """A reused session turned out to be dead before any of the message was sent."""


class _AbandonedReply(smtplib.SMTPServerDisconnected):
    """A reply overran its time or size, so we stopped reading it and closed the session.

    A disconnection to the rest of the module: the session is unusable, and what that
    means (transient, or unknown once the message went out) depends on the stage, as
    for a hang-up.
    """


class _ReplyTimeout(_AbandonedReply, TimeoutError):
    """A reply did not end within the timeout, whether the server was silent or trickling."""


class _Session(smtplib.SMTP):
    """`smtplib.SMTP` whose `timeout` bounds each whole reply, not each socket read.

    smtplib leaves the timeout on the socket, where it bounds one recv: a server that
    sends an endless multi-line reply (or one very long line) a byte at a time, each
    byte within the timeout, would hold the thread forever (RELIABILITY.md, F1).
    smtplib reads every reply, the greeting included, through `getreply`; this one is
    CPython's (3.10-3.13) with the reads made against a deadline and the reply capped.
    """

    def getreply(self) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self.file is None:
            self.file = sock.makefile("rb")
        resp: list[bytes] = []
        size = 0
        try:
            while True:
                try:
                    line = _readline(sock, self.file, deadline)
                except TimeoutError as exc:
                    self.close()
                    raise _ReplyTimeout(f"no complete reply within {self.timeout:g} s") from exc
                except OSError as exc:
                    self.close()
                    raise smtplib.SMTPServerDisconnected(
                        "Connection unexpectedly closed: " + str(exc)
                    ) from exc
                if not line:
                    self.close()
                    raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                if len(line) > _MAX_LINE:
                    # smtplib raises a made-up "500 Line too long." here, which would
                    # read as the server's permanent refusal (of a message it may have
                    # just accepted); it is an overrun like the others.
                    self.close()
                    raise _AbandonedReply(f"reply line longer than {_MAX_LINE} bytes")
                resp.append(line[4:].strip(b" \t\r\n"))
                size += len(line)
                # A broken reply code ends the reply: reading on would be guessing.
                try:
                    errcode = int(line[:3])
                except ValueError:
                    errcode = -1
                    break
                if line[3:4] != b"-":
                    break
                if len(resp) >= _MAX_REPLY_LINES or size > _MAX_REPLY_BYTES:
                    self.close()
                    raise _AbandonedReply(
                        f"reply longer than {_MAX_REPLY_LINES} lines or {_MAX_REPLY_BYTES} bytes"
                    )
        finally:
            # The deadline shrank the socket's timeout; sending (the message, the next
            # command, a TLS handshake) gets the full one again.
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(self.timeout)
        return errcode, b"\n".join(resp)


class _TlsSession(_Session, smtplib.SMTP_SSL):
    """`smtplib.SMTP_SSL` with `_Session`'s bounded replies."""


def _readline(sock: Any, file: Any, deadline: float) -> bytes:
    """`file.readline(_MAX_LINE + 1)` as smtplib calls it, with every recv within `deadline`.

    readline would wait for the whole line, giving each recv the socket's full timeout;
    `peek` does at most one recv, so the timeout can shrink before each.
    """
    line = b""
    limit = _MAX_LINE + 1
    while len(line) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = file.peek()  # what is buffered, or what one recv brings; empty at EOF
        if not chunk:
            break
        end = chunk.find(b"\n", 0, limit - len(line))
        line += file.read1(end + 1 if end >= 0 else min(len(chunk), limit - len(line)))
        if end >= 0:
            break
    return line


class SmtpTransport:
    """Sends messages to one SMTP server (a relay or a submission service).

    Arguments:
        host, port: the server; port defaults to 587 for ``security="starttls"``,
            465 for ``"tls"`` and 25 for ``"none"``.
        security: ``"starttls"`` (the default) upgrades the session with STARTTLS
            and fails with PermanentSendError if the server does not offer it,
            so mail and credentials never travel in clear by accident; ``"tls"``
            is implicit TLS from the first byte; ``"none"`` is plain text, meant
            for a relay on loopback and for tests.
        username, password: log in (SMTP AUTH) after the TLS upgrade. Given
            together or not at all. The password never appears in an exception,
            a repr or a log line.
        timeout: seconds any single network operation may take during the
            transaction before the attempt fails (transient, or unknown if the
            message was already sent). A reply counts as one operation however
            the server spreads it out, so a server trickling bytes cannot hold
            the thread past it.
        connect_timeout: the same for opening a session (connect, greeting,
            EHLO, TLS handshake, AUTH); defaults to `timeout`.
        local_hostname: the name sent in EHLO; defaults to the host's FQDN.
        ssl_context: how the server certificate is checked; defaults to
            `ssl.create_default_context()` (system CAs, host name checked).

    Thread-safe: every thread that calls `send` keeps one session of its own and
    reuses it for its next messages. A reused session that the server closed
    while idle is reopened once, transparently, as long as none of the message
    was sent yet. After any failure the thread's session is dropped, so the
    next send starts clean. `close()` ends every session the transport opened;
    call it once the sending threads are done. The transport stays usable
    afterwards (the next send opens a new session).
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        security: Security = "starttls",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        local_hostname: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a non-empty string")
        if security not in DEFAULT_PORTS:
            raise ValueError(
                f"security must be one of {', '.join(map(repr, DEFAULT_PORTS))}, got {security!r}"
            )
        if port is None:
            port = DEFAULT_PORTS[security]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an int between 1 and 65535, got {port!r}")
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        if not (username or "").isascii() or not (password or "").isascii():
            # smtplib encodes the AUTH exchange as ASCII: found at every send instead,
            # it would dead-letter each mail with a UnicodeEncodeError.
            raise ValueError("username and password must be ASCII (smtplib's AUTH sends ASCII)")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if ssl_context is not None and security == "none":
            raise ValueError('ssl_context has no use with security="none"')

        self._host = host
        self._port = port
        self._security: Security = security
        self._username = username
        self._password = _Secret(password) if password is not None else None
        self._timeout = float(timeout)
        self._connect_timeout = float(connect_timeout) if connect_timeout else self._timeout
        self._local_hostname = local_hostname
        self._ssl_context = (
            None if security == "none" else ssl_context or ssl.create_default_context()
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every session opened and not yet closed, with the thread that owns it: close()
        # must reach sessions of other threads, and sessions of finished threads are
        # closed when the next session opens (a thread pool per tick would leak them).
        self._sessions: dict[smtplib.SMTP, threading.Thread] = {}

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def security(self) -> Security:
        return self._security

    @property
    def username(self) -> str | None:
        return self._username

    @property
    def timeout(self) -> float:
        return self._timeout

    def __repr__(self) -> str:
        user = f", username={self._username!r}" if self._username is not None else ""
        return (
            f"SmtpTransport(host={self._host!r}, port={self._port}, "
            f"security={self._security!r}{user})"
        )

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------

    def send(self, envelope: Envelope) -> SendResult:
        """Send one message; see the class docstring for the failure mapping.

        Returns a SendResult whose `refused` maps each recipient the server refused
        (while accepting others) to its (code, text). Recipients answered 452 or 552
        (the server's limit per transaction) get the message in new transactions; those
        never accepted are in `refused`. Raises TransientSendError,
        UnknownSendOutcome or PermanentSendError, and only while no recipient has
        the message yet.
        """
        _check_envelope(envelope)
        message = _LINE_BREAK.sub(b"\r\n", envelope.message)
        log.debug(
            "delivery %s: sending %d bytes to %d recipient(s) via %s:%d",
            envelope.delivery_id,
            len(message),
            len(envelope.recipients),
            self._host,
            self._port,
        )
        try:
            session = self._current_session()
            if session is not None:
                try:
                    return self._transaction(session, envelope, message, reused=True)
                except _StaleConnection:
                    log.debug(
                        "delivery %s: idle session to %s:%d was closed by the server; reconnecting",
                        envelope.delivery_id,
                        self._host,
                        self._port,
                    )
            session = self._open_session()
            return self._transaction(session, envelope, message, reused=False)
        except SendError as exc:
            log.debug("delivery %s: %s: %s", envelope.delivery_id, type(exc).__name__, exc)
            raise

    def _transaction(
        self, session: smtplib.SMTP, envelope: Envelope, message: bytes, *, reused: bool
    ) -> SendResult:
        refused: dict[str, tuple[int, str]] = {}
        self._exchange(session, envelope, envelope.recipients, message, refused, reused=reused)
        # RFC 5321 4.5.3.1.10: a 452 to RCPT while other recipients were accepted is
        # how a server says "too many recipients"; the rest go in new transactions on
        # the same session, the same message, for as long as each one delivers to
        # someone. (A 452 that means a full mailbox costs one transaction that gets
        # the same 452.) Bcc recipients are envelope addresses only, so the bytes
        # sent are the same for them.
        pending = _over_the_limit(refused)
        while pending:
            log.debug(
                "delivery %s: %d recipient(s) over the server's limit; new transaction",
                envelope.delivery_id,
                len(pending),
            )
            replies: dict[str, tuple[int, str]] = {}
            try:
                self._exchange(session, envelope, tuple(pending), message, replies, follow_up=True)
            except SendError as exc:
                # The message is with the recipients of an earlier transaction already:
                # retrying the whole mail would send it to them twice. The recipients
                # it did not reach are reported refused, as any partial refusal is.
                for recipient in pending:
                    refused[recipient] = replies.get(recipient) or _undelivered(
                        refused[recipient], exc
                    )
                break
            for recipient in pending:
                if recipient in replies:
                    refused[recipient] = replies[recipient]
                else:
                    del refused[recipient]
            if len(replies) == len(pending):
                break  # nobody accepted this time: no progress to build on
            pending = _over_the_limit(replies)
        if refused:
            log.debug(
                "delivery %s: accepted; %d recipient(s) refused",
                envelope.delivery_id,
                len(refused),
            )
        return SendResult(refused=refused)

    def _exchange(
        self,
        session: smtplib.SMTP,
        envelope: Envelope,
        recipients: tuple[str, ...],
        message: bytes,
        refused: dict[str, tuple[int, str]],
        *,
        reused: bool = False,
        follow_up: bool = False,
    ) -> None:
        """One transaction (MAIL, RCPT for each of `recipients`, DATA) on `session`.

        Fills `refused` with the recipients the server refused, as their replies come.
        When it refuses them all, the first transaction of a send raises, as nothing
        was sent; a follow-up one (`follow_up`) ends the transaction with RSET and
        returns. Any failure drops the session and raises a SendError, or
        `_StaleConnection` for a `reused` session found dead before anything was sent.
        """
        stage = _MAIL
        try:
            # A previous SMTPUTF8 transaction leaves smtplib encoding commands as UTF-8.
            session.command_encoding = "ascii"
            options = self._mail_options(session, envelope, message)
            code, text = session.mail(envelope.sender, options)
            if code != 250:
                # A server that timed out the idle session may answer its last words
                # (421) to our MAIL; nothing of the message has gone out yet.
                if reused and code == 421:
                    raise _StaleConnection
                raise self._reply_error(_MAIL, code, text)

            stage = _RCPT
            for recipient in recipients:
                code, text = session.rcpt(recipient)
                if code in (250, 251):
                    continue
                # Only a 4xx/5xx refuses a recipient. 421 says the server is closing the
                # session; anything else (1xx, 354, a line without a code) is a protocol
                # error, transient as at MAIL or DATA, never a refusal to report or,
                # for the only recipient, a permanent failure.
                if code == 421 or not 400 <= code < 600:
                    raise self._reply_error(_RCPT, code, text)
                refused[recipient] = (code, self._clean(text))
            if len(refused) == len(recipients):
                if not follow_up:
                    raise _all_refused(refused)
                stage = _RSET
                code, text = session.rset()
                if code != 250:
                    raise self._reply_error(_RSET, code, text)
                return

            stage = _DATA
            code, text = session.docmd("DATA")
            if code != 354:
                raise self._reply_error(_DATA, code, text)

            stage = _MESSAGE
            session.send(_LEADING_DOT.sub(b"..", message) + _terminator(message))

            # From here on the server may hold the message whatever happens next.
            stage = _FINAL_REPLY
            code, text = session.getreply()
            if code != 250:
                raise self._reply_error(_FINAL_REPLY, code, text)
        except _StaleConnection:
            self._discard(session)
            raise
        except smtplib.SMTPServerDisconnected as exc:
            self._discard(session)
            if reused and stage == _MAIL:
                raise _StaleConnection from exc
            raise self._lost(stage, exc) from exc
        except SendError:
            self._discard(session)
            raise
        except (smtplib.SMTPException, OSError) as exc:
            self._discard(session)
            raise self._translate(stage, exc) from exc
        except ValueError as exc:
            self._discard(session)
            if isinstance(exc, UnicodeError):
                raise
            raise self._malformed(stage, exc) from exc
        except BaseException:
            self._discard(session)
            raise

    def _mail_options(self, session: smtplib.SMTP, envelope: Envelope, message: bytes) -> list[str]:
        # As smtplib.sendmail/send_message do: SIZE when offered, SMTPUTF8 (with
        # 8BITMIME, RFC 6531) when addresses or headers are UTF-8, else 8BITMIME
        # for an 8-bit body.
        header_end = message.find(b"\r\n\r\n")
        headers = message if header_end < 0 else message[:header_end]
        needs_smtputf8 = not (
            envelope.sender.isascii()
            and all(r.isascii() for r in envelope.recipients)
            and headers.isascii()
        )
        if not session.does_esmtp:
            if needs_smtputf8:
                raise PermanentSendError(
                    None, "the message needs SMTPUTF8 and the server does not speak ESMTP"
                )
            return []
        options: list[str] = []
        if session.has_extn("size"):
            options.append(f"SIZE={len(message)}")
        if needs_smtputf8:
            if not session.has_extn("smtputf8"):
                raise PermanentSendError(
                    None,
                    "the message needs SMTPUTF8 (non-ASCII addresses or headers) "
                    "and the server does not offer it",
                )
            options += ["SMTPUTF8", "BODY=8BITMIME"]
        elif not message.isascii() and session.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        # An 8-bit body for a server without 8BITMIME is sent as is, like smtplib
        # does: nearly every server takes it, and refusing would dead-letter mail.
        return options

    # -- sessions --------------------------------------------------------------------------

    def _current_session(self) -> smtplib.SMTP | None:
        session: smtplib.SMTP | None = getattr(self._local, "session", None)
        if session is not None and session.sock is None:
            # close() from another thread ended it.
            self._discard(session)
            return None
        return session

    def _open_session(self) -> smtplib.SMTP:
        """A ready session (connected, greeted, TLS, logged in), or ServerUnavailable.

        A transient failure before any transaction says nothing about the message:
        reported as ServerUnavailable, it pauses the worker instead of costing the
        delivery an attempt.
        """
        try:
            return self._start_session()
        except TransientSendError as exc:
            if isinstance(exc, ServerUnavailable | UnknownSendOutcome):
                raise
            raise ServerUnavailable(exc.code, exc.message, enhanced_code=exc.enhanced_code) from exc

    def _start_session(self) -> smtplib.SMTP:
        # smtplib must get the host in its constructor: that is where it records the
        # name that TLS (implicit or STARTTLS) checks the certificate against.
        session: smtplib.SMTP
        try:
            if self._security == "tls":
                session = _TlsSession(
                    self._host,
                    self._port,
                    local_hostname=self._local_hostname,
                    timeout=self._connect_timeout,
                    context=self._ssl_context,
                )
            else:
                session = _Session(
                    self._host,
                    self._port,
                    local_hostname=self._local_hostname,
                    timeout=self._connect_timeout,
                )
        except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected) as exc:
            # Connected, but no 220 greeting (another reply, a hang-up, a timeout);
            # smtplib has closed the socket.
            raise self._translate(_GREETING, exc) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise self._translate(_CONNECT, exc) from exc
        self._register(session)
        stage = _EHLO
        try:
            session.ehlo_or_helo_if_needed()
            if self._security == "starttls":
                stage = _STARTTLS
                if not session.has_extn("starttls"):
                    raise PermanentSendError(
                        None,
                        f"{self._host}:{self._port} does not offer STARTTLS, which "
                        'security="starttls" requires; use security="tls" for implicit '
                        'TLS, or security="none" only for a trusted local relay',
                    )
                session.starttls(context=self._ssl_context)
                stage = _EHLO
                session.ehlo_or_helo_if_needed()
            if self._username is not None and self._password is not None:
                stage = _AUTH
                session.login(self._username, self._password.reveal())
            # The session's `timeout` bounds each reply (`_Session.getreply`), the
            # socket's each send.
            assert session.sock is not None
            session.sock.settimeout(self._timeout)
            session.timeout = self._timeout
        except SendError:
            self._discard(session)
            raise
        except smtplib.SMTPServerDisconnected as exc:
            self._discard(session)
            raise self._lost(stage, exc) from exc
        except (smtplib.SMTPException, OSError) as exc:
            self._discard(session)
            raise self._translate(stage, exc) from exc
        except ValueError as exc:
            self._discard(session)
            if isinstance(exc, UnicodeError):
                raise
            raise self._malformed(stage, exc) from exc
        except BaseException:
            self._discard(session)
            raise
        log.debug(
            "opened SMTP session to %s:%d (security=%s)", self._host, self._port, self._security
        )
        return session

    def _register(self, session: smtplib.SMTP) -> None:
        with self._lock:
            orphans = [s for s, owner in self._sessions.items() if not owner.is_alive()]
            for orphan in orphans:
                del self._sessions[orphan]
            self._sessions[session] = threading.current_thread()
        self._local.session = session
        for orphan in orphans:
            _close_quietly(orphan)

    def _discard(self, session: smtplib.SMTP) -> None:
        with self._lock:
            self._sessions.pop(session, None)
        if getattr(self._local, "session", None) is session:
            self._local.session = None
        _close_quietly(session)

    def close(self) -> None:
        """End every session this transport opened (QUIT, then close).

        Call it when no thread is sending any more: a session closed under a
        running send fails that send. Errors while closing are ignored.
        """
        with self._lock:
            sessions = list(self._sessions)
            self._sessions.clear()
        self._local.session = None
        for session in sessions:
            if session.sock is not None:
                with contextlib.suppress(Exception):
                    session.timeout = min(self._timeout, _QUIT_TIMEOUT)
                    session.sock.settimeout(session.timeout)
                    session.quit()
            _close_quietly(session)
        if sessions:
            log.debug("closed %d SMTP session(s) to %s:%d", len(sessions), self._host, self._port)

    # -- errors ----------------------------------------------------------------------------

    def _clean(self, text: bytes | str) -> str:
        """Server or library text made safe to store: no secrets, no controls, bounded."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self._password is not None:
            for secret in self._secret_forms():
                text = text.replace(secret, "***")
        text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\n", " | ")).strip()
        if len(text) > MAX_SERVER_TEXT:
            text = text[: MAX_SERVER_TEXT - 1] + "\u2026"
        return text

    def _secret_forms(self) -> list[str]:
        # The password as typed and as smtplib puts it on the wire for AUTH PLAIN/LOGIN.
        assert self._password is not None
        password = self._password.reveal()
        if not password:
            return []
        user = self._username or ""
        encoded = [
            password.encode("utf-8"),
            f"\0{user}\0{password}".encode(),
        ]
        return [password, *(base64.b64encode(raw).decode("ascii") for raw in encoded)]

    def _reply_error(self, stage: str, code: int, text: bytes | str) -> SendError:
        clean = self._clean(text)
        message = f"{stage}: {clean}" if clean else stage
        enhanced = _enhanced_code(code, clean)
        if 400 <= code < 500:
            return TransientSendError(code, message, enhanced_code=enhanced)
        if 500 <= code < 600:
            return PermanentSendError(code, message, enhanced_code=enhanced)
        # Neither a success nor a failure reply: garbage from the server or a middlebox.
        known = code if 100 <= code < 600 else None
        if stage == _FINAL_REPLY:
            return UnknownSendOutcome(known, f"{stage}: unexpected reply: {clean}")
        return TransientSendError(known, f"{stage}: unexpected reply: {clean}")

    def _lost(self, stage: str, exc: BaseException) -> SendError:
        detail = self._clean(str(exc))
        if isinstance(exc, _AbandonedReply):
            # We hung up on a reply that overran; that leaves as much unknown as a hang-up
            # from the server.
            where = f"{stage}: {self._host}:{self._port}: {detail}"
            if stage == _FINAL_REPLY:
                return UnknownSendOutcome(
                    None, f"{where}, after the message was sent (the server may have accepted it)"
                )
            return TransientSendError(None, where)
        if stage == _FINAL_REPLY:
            return UnknownSendOutcome(
                None,
                "connection lost after the message was sent, before the server's reply "
                f"(the server may have accepted it): {detail}",
            )
        return TransientSendError(None, f"{stage}: connection lost: {detail}")

    def _malformed(self, stage: str, exc: ValueError) -> SendError:
        # smtplib lets some malformed replies escape as a ValueError, such as a 334 AUTH
        # challenge that is not base64 (binascii.Error): garbage from the server, as
        # transient as garbage anywhere else. A UnicodeError is not one of them (it is
        # text of ours smtplib cannot encode, e.g. a non-ASCII password) and the
        # callers let it through.
        where = f"{stage}: {self._host}:{self._port}: malformed reply"
        detail = self._clean(str(exc)) or type(exc).__name__
        if stage == _FINAL_REPLY:
            return UnknownSendOutcome(
                None,
                f"{where} after the message was sent (the server may have accepted it): {detail}",
            )
        return TransientSendError(None, f"{where}: {detail}")

    def _translate(self, stage: str, exc: BaseException) -> SendError:
        if isinstance(exc, smtplib.SMTPResponseException):
            return self._reply_error(stage, exc.smtp_code, exc.smtp_error)
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            return self._lost(stage, exc)
        if isinstance(exc, smtplib.SMTPException):
            # The server lacks what the configuration asks for (AUTH, an AUTH
            # mechanism smtplib knows): retrying the same server cannot help.
            return PermanentSendError(None, f"{stage}: {self._clean(str(exc))}")
        if isinstance(exc, TimeoutError):
            return TransientSendError(None, f"{stage}: {self._host}:{self._port} timed out")
        # Refused, reset or unreachable connections, DNS failures and TLS handshake
        # errors (a renewed certificate fixes those) are all worth another try.
        detail = self._clean(str(exc)) or exc.__class__.__name__
        return TransientSendError(None, f"{stage}: {self._host}:{self._port}: {detail}")


def _check_envelope(envelope: Envelope) -> None:
    if not envelope.recipients:
        raise PermanentSendError(None, "the envelope has no recipients")
    for address in (envelope.sender, *envelope.recipients):
        # smtplib would refuse CR/LF itself; other controls would reach the server.
        if _CONTROL.search(address):
            raise PermanentSendError(None, "an envelope address contains a control character")
    if not isinstance(envelope.message, bytes):
        raise PermanentSendError(None, "the message must be bytes")


def _terminator(message: bytes) -> bytes:
    return b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n"


def _all_refused(refused: dict[str, tuple[int, str]]) -> SendError:
    # One 4xx among the refusals is enough to retry: that recipient may accept later,
    # and the reported code is the first one of the class that decided.
    replies = list(refused.values())
    transient = [reply for reply in replies if 400 <= reply[0] < 500]
    code, text = (transient or replies)[0]
    message = f"{_RCPT}: all {len(replies)} recipient(s) refused; first: {code} {text}"
    enhanced = _enhanced_code(code, text)
    if transient:
        return TransientSendError(code, message, enhanced_code=enhanced, refused=refused)
    return PermanentSendError(code, message, enhanced_code=enhanced, refused=refused)


def _undelivered(deferred: tuple[int, str], exc: SendError) -> tuple[int, str]:
    """What to report for a recipient deferred with `deferred` (a 452) whose follow-up
    transaction failed with `exc`: the failure's reply, else the 452 and what happened."""
    if exc.code is not None and 400 <= exc.code < 600:
        return exc.code, exc.message
    code, text = deferred
    return code, f"{text}; then, in a new transaction: {exc.message}"


def _enhanced_code(code: int, text: str) -> str | None:
    match = _ENHANCED_CODE.match(text)
    if match is None or str(code)[:1] != match.group(1):
        return None
    return ".".join(match.groups())


def _close_quietly(session: smtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        session.close()
