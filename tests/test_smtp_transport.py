"""SmtpTransport against a real aiosmtpd server on loopback (tests/smtp_sink.py)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailoutbox.errors import (
    PermanentSendError,
    SendError,
    ServerUnavailable,
    TransientSendError,
    UnknownSendOutcome,
)
from mailoutbox.transports import Envelope, SendResult, SmtpTransport

from .fault.trickle_server import TrickleServer
from .smtp_sink import (
    HANG_UP,
    SERVER_CERT,
    SmtpSink,
    client_tls_context,
    server_tls_context,
)

SENDER = "noreply@example.com"
USER = "mailer"
PASSWORD = "s3cr3t-Pa55word-never-shown"

MakeTransport = Callable[..., SmtpTransport]


def make_envelope(
    recipients: tuple[str, ...] = ("alice@example.com",),
    *,
    body: bytes = b"Hello Alice,\r\n\r\nWelcome aboard.\r\n",
    headers: bytes = b"Subject: Welcome\r\n",
    sender: str = SENDER,
) -> Envelope:
    delivery_id = uuid.uuid4()
    message_id = f"<{delivery_id}@example.com>"
    message = (
        f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nMessage-ID: {message_id}\r\n".encode()
        + headers
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + body
    )
    return Envelope(
        delivery_id=delivery_id,
        sender=sender,
        recipients=recipients,
        message=message,
        message_id=message_id,
    )


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.fixture
def auth_sink() -> Iterator[SmtpSink]:
    with SmtpSink(credentials=(USER, PASSWORD), auth_required=True) as server:
        yield server


@pytest.fixture
def make_transport() -> Iterator[MakeTransport]:
    """Build transports for a sink (plain SMTP by default) and close them all afterwards."""
    transports: list[SmtpTransport] = []

    def make(server: SmtpSink, **kwargs: object) -> SmtpTransport:
        kwargs.setdefault("security", "none")
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("local_hostname", "client.localhost")
        transport = SmtpTransport(server.host, server.port, **kwargs)  # type: ignore[arg-type]
        transports.append(transport)
        return transport

    yield make
    for transport in transports:
        transport.close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert PASSWORD not in str(text)


# -- success ---------------------------------------------------------------------------------


def test_message_bytes_arrive_intact(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """The server receives exactly the envelope and bytes sent, leading dots included."""
    body = b"Line one\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n"
    envelope = make_envelope(("alice@example.com", "bob@example.com"), body=body)

    result = make_transport(sink).send(envelope)

    assert result == SendResult(refused={})
    [received] = sink.messages
    assert received.data == envelope.message
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("alice@example.com", "bob@example.com")
    assert received.message_id == envelope.message_id


def test_size_is_declared_when_offered(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """MAIL FROM carries SIZE with the message length when the server offers SIZE."""
    envelope = make_envelope()

    make_transport(sink).send(envelope)

    assert f"SIZE={len(envelope.message)}" in sink.messages[0].mail_options


def test_bare_line_feeds_are_sent_as_crlf(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """Bare LF and CR line breaks reach the server as CRLF, so none can end DATA early."""
    envelope = make_envelope(body=b"one\ntwo\rthree\n.\nfour\r\n")

    make_transport(sink).send(envelope)

    received = sink.messages[0].data
    assert received.endswith(b"one\r\ntwo\r\nthree\r\n.\r\nfour\r\n")
    assert b"\r\n" not in received.replace(b"\r\n", b"")
    assert received.count(b"\n") == received.count(b"\r\n")


def test_message_without_final_line_break_is_terminated(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A message whose last line lacks CRLF is still terminated correctly."""
    envelope = make_envelope(body=b"no newline at the end")

    make_transport(sink).send(envelope)

    assert sink.messages[0].data == envelope.message + b"\r\n"


def test_eight_bit_body_declares_8bitmime(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """An 8-bit body is sent with BODY=8BITMIME when the server offers it."""
    envelope = make_envelope(body="Grüße, Zoë\r\n".encode())

    make_transport(sink).send(envelope)

    [received] = sink.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert "SMTPUTF8" not in received.mail_options
    assert received.data == envelope.message


def test_international_address_uses_smtputf8(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """A non-ASCII recipient is sent with SMTPUTF8 when the server offers it."""
    envelope = make_envelope(("zoë@example.com",))

    make_transport(sink).send(envelope)

    [received] = sink.messages
    assert received.rcpt_tos == ("zoë@example.com",)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(received.mail_options)


def test_international_address_without_smtputf8_is_permanent(
    make_transport: MakeTransport,
) -> None:
    """A non-ASCII address fails permanently when the server lacks SMTPUTF8."""
    with SmtpSink(smtputf8=False) as server:
        with pytest.raises(PermanentSendError, match="SMTPUTF8"):
            make_transport(server).send(make_envelope(("zoë@example.com",)))
        assert server.messages == []


# -- sessions --------------------------------------------------------------------------------


def test_connection_is_reused_across_messages_on_one_thread(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """Two messages sent from one thread travel over a single SMTP connection."""
    transport = make_transport(sink)

    transport.send(make_envelope())
    transport.send(make_envelope())

    assert sink.connections == 1
    assert [m.connection for m in sink.messages] == [1, 1]


def test_each_thread_gets_its_own_connection(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """Threads sending at the same time each use a connection of their own."""
    transport = make_transport(sink)
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait(timeout=5)
        transport.send(make_envelope())
        transport.send(make_envelope())

    with ThreadPoolExecutor(max_workers=3) as pool:
        for future in [pool.submit(worker) for _ in range(3)]:
            future.result(timeout=10)

    assert len(sink.messages) == 6
    assert sink.connections == 3
    by_connection = Counter(message.connection for message in sink.messages)
    assert sorted(by_connection.values()) == [2, 2, 2]


def test_close_ends_every_session(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """close() ends the sessions of every thread, and a later send opens a new one."""
    transport = make_transport(sink)
    sent, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        transport.send(make_envelope())
        sent.set()
        release.wait(timeout=10)  # stay alive: a finished thread's session is reaped

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert sent.wait(timeout=10)
        transport.send(make_envelope())
        assert sink.open_connections == 2

        transport.close()

        SmtpSink._wait(lambda: sink.open_connections == 0, 5.0, "sessions to end")
        transport.send(make_envelope())
        assert sink.connections == 3
    finally:
        release.set()
        thread.join(timeout=10)


def test_session_of_finished_thread_is_closed(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A session left by a thread that has ended is closed when the next session opens."""
    transport = make_transport(sink)
    thread = threading.Thread(target=transport.send, args=(make_envelope(),))
    thread.start()
    thread.join(timeout=10)
    assert sink.open_connections == 1

    transport.send(make_envelope())

    SmtpSink._wait(lambda: sink.open_connections == 1, 5.0, "the orphan session to end")
    assert sink.connections == 2


def test_reconnects_after_server_closes_idle_connection(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A reused connection the server closed while idle is reopened and the send succeeds."""
    transport = make_transport(sink)
    transport.send(make_envelope())
    sink.disconnect_all()

    transport.send(make_envelope())

    assert sink.connections == 2
    assert [m.connection for m in sink.messages] == [1, 2]


def test_reconnects_after_421_to_mail_on_idle_connection(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A 421 to MAIL on a reused connection (an idle timeout) is retried on a new one."""
    transport = make_transport(sink)
    transport.send(make_envelope())
    sink.next_mail_replies = ["421 4.4.2 Idle timeout, closing connection"]

    transport.send(make_envelope())

    assert sink.connections == 2
    assert [m.connection for m in sink.messages] == [1, 2]


def test_next_send_reconnects_after_a_failure(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """After a failed send the thread's connection is dropped and the next send reconnects."""
    transport = make_transport(sink)
    sink.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    with pytest.raises(PermanentSendError):
        transport.send(make_envelope(("gone@example.com",)))

    transport.send(make_envelope())

    assert sink.connections == 2
    assert sink.messages[0].connection == 2


# -- failure replies -------------------------------------------------------------------------


def test_greeting_421_is_transient(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """A 421 greeting is ServerUnavailable (transient) with code 421 and its enhanced code."""
    sink.greeting = "421 4.3.2 Service not available, try later"

    with pytest.raises(TransientSendError) as info:
        make_transport(sink).send(make_envelope())

    assert type(info.value) is ServerUnavailable
    assert info.value.code == 421
    assert info.value.enhanced_code == "4.3.2"
    assert "greeting" in str(info.value)


def test_greeting_554_is_permanent(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """A 554 greeting (no service for this client) raises PermanentSendError."""
    sink.greeting = "554 5.7.1 Client host rejected"

    with pytest.raises(PermanentSendError) as info:
        make_transport(sink).send(make_envelope())

    assert (info.value.code, info.value.enhanced_code) == (554, "5.7.1")


@pytest.mark.parametrize(
    ("reply", "error", "code", "enhanced"),
    [
        ("421 4.4.2 Closing connection", TransientSendError, 421, "4.4.2"),
        ("451 4.3.0 Temporary sender failure", TransientSendError, 451, "4.3.0"),
        ("550 5.1.8 Sender address rejected", PermanentSendError, 550, "5.1.8"),
    ],
)
def test_mail_from_reply_is_mapped(
    sink: SmtpSink,
    make_transport: MakeTransport,
    reply: str,
    error: type[SendError],
    code: int,
    enhanced: str,
) -> None:
    """A failure reply to MAIL FROM maps to the error class of its reply class."""
    sink.mail_reply = reply

    with pytest.raises(error) as info:
        make_transport(sink).send(make_envelope())

    assert type(info.value) is error
    assert (info.value.code, info.value.enhanced_code) == (code, enhanced)
    assert sink.messages == []


@pytest.mark.parametrize(
    ("reply", "error", "code", "enhanced"),
    [
        ("450 4.2.0 Mailbox busy", TransientSendError, 450, "4.2.0"),
        ("451 4.7.1 Greylisted, try again later", TransientSendError, 451, "4.7.1"),
        ("452 4.2.2 Mailbox full", TransientSendError, 452, "4.2.2"),
        ("550 5.1.1 No such user here", PermanentSendError, 550, "5.1.1"),
        ("553 Mailbox name not allowed", PermanentSendError, 553, None),
    ],
)
def test_refused_recipient_reply_is_mapped(
    sink: SmtpSink,
    make_transport: MakeTransport,
    reply: str,
    error: type[SendError],
    code: int,
    enhanced: str | None,
) -> None:
    """A refusal of the only recipient maps to the error class, code and enhanced code."""
    sink.rcpt_replies = {"alice@example.com": reply}

    with pytest.raises(error) as info:
        make_transport(sink).send(make_envelope())

    assert type(info.value) is error
    assert (info.value.code, info.value.enhanced_code) == (code, enhanced)
    assert sink.messages == []


@pytest.mark.parametrize(
    ("reply", "code"),
    [("150 huh", 150), ("354 Start mail input", 354), ("this is not SMTP", None)],
    ids=["1xx", "354", "garbage"],
)
@pytest.mark.parametrize(
    "recipients",
    [("alice@example.com",), ("bob@example.com", "alice@example.com")],
    ids=["only-recipient", "after-an-accepted-one"],
)
def test_unexpected_rcpt_reply_is_a_transient_protocol_error(
    sink: SmtpSink,
    make_transport: MakeTransport,
    reply: str,
    code: int | None,
    recipients: tuple[str, ...],
) -> None:
    """A reply to RCPT that is neither success nor 4xx/5xx is no refusal: retry the mail."""
    sink.rcpt_replies = {"alice@example.com": reply}

    with pytest.raises(TransientSendError) as info:
        make_transport(sink).send(make_envelope(recipients))

    assert type(info.value) is TransientSendError
    assert info.value.code == code
    assert "RCPT TO: unexpected reply" in str(info.value)
    assert sink.messages == []


def test_all_recipients_refused_with_one_4xx_is_transient(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """When every recipient is refused and one refusal is 4xx, the error is transient."""
    sink.rcpt_replies = {
        "alice@example.com": "550 5.1.1 No such user",
        "bob@example.com": "452 4.2.2 Mailbox full",
    }

    with pytest.raises(TransientSendError) as info:
        make_transport(sink).send(make_envelope(("alice@example.com", "bob@example.com")))

    assert (info.value.code, info.value.enhanced_code) == (452, "4.2.2")
    assert "all 2 recipient(s) refused" in str(info.value)


def test_all_recipients_refused_with_5xx_is_permanent(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """When every recipient is refused with 5xx, the first refusal's code is reported."""
    sink.rcpt_replies = {
        "alice@example.com": "550 5.1.1 No such user",
        "bob@example.com": "551 5.1.6 User has moved",
    }

    with pytest.raises(PermanentSendError) as info:
        make_transport(sink).send(make_envelope(("alice@example.com", "bob@example.com")))

    assert (info.value.code, info.value.enhanced_code) == (550, "5.1.1")


def test_partial_refusal_returns_refused_recipient(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """One refused recipient of three is reported in SendResult.refused; the others get it."""
    sink.rcpt_replies = {"bob@example.com": "550 5.1.1 No such user"}
    envelope = make_envelope(("alice@example.com", "bob@example.com", "carol@example.com"))

    result = make_transport(sink).send(envelope)

    assert result.refused == {"bob@example.com": (550, "5.1.1 No such user")}
    [received] = sink.messages
    assert received.rcpt_tos == ("alice@example.com", "carol@example.com")


# -- too many recipients (RFC 5321 4.5.3.1.10) -----------------------------------------------


@pytest.mark.parametrize(
    "limit_reply", ["452 4.5.3 Too many recipients", "552 5.5.3 Too many recipients"]
)
def test_recipients_past_the_servers_limit_get_the_message_in_new_transactions(
    sink: SmtpSink, make_transport: MakeTransport, limit_reply: str
) -> None:
    """452 to the recipients past a relay's cap: they get the same message in new transactions.

    A 552 is RFC 821's code for the same limit, to be taken as a 452 (RFC 5321
    4.5.3.1.10): as a refusal, those recipients never got the mail.
    """
    sink.max_recipients = 2
    sink.too_many_recipients_reply = limit_reply
    recipients = tuple(f"r{n}@example.com" for n in range(5))
    envelope = make_envelope(recipients)

    result = make_transport(sink).send(envelope)

    assert result == SendResult(refused={})
    assert [m.rcpt_tos for m in sink.messages] == [recipients[:2], recipients[2:4], recipients[4:]]
    assert {m.data for m in sink.messages} == {envelope.message}
    assert {m.connection for m in sink.messages} == {1}


@pytest.mark.parametrize(
    ("reply", "refusal"),
    [
        ("451 4.3.0 Local error", (451, "end of DATA: 4.3.0 Local error")),
        ("554 5.7.1 Rejected", (554, "end of DATA: 5.7.1 Rejected")),
        (HANG_UP, (452, "4.5.3 Too many recipients; then, in a new transaction: connection lost")),
    ],
    ids=["4xx", "5xx", "hang-up"],
)
def test_failed_new_transaction_reports_its_recipients_refused_not_a_retry(
    sink: SmtpSink, make_transport: MakeTransport, reply: str, refusal: tuple[int, str]
) -> None:
    """Once some recipients have the message, a later transaction's failure must not resend it."""
    sink.max_recipients = 2
    sink.next_data_replies = [None, reply]
    recipients = ("a@example.com", "b@example.com", "c@example.com")

    result = make_transport(sink).send(make_envelope(recipients))

    [(code, text)] = result.refused.values()
    assert list(result.refused) == ["c@example.com"]
    assert code == refusal[0] and text.startswith(refusal[1])
    assert [m.rcpt_tos for m in sink.messages] == [recipients[:2]]


@pytest.mark.parametrize("code", [452, 552])
def test_recipient_refused_again_in_a_new_transaction_stays_refused(
    sink: SmtpSink, make_transport: MakeTransport, code: int
) -> None:
    """A 452 or 552 not about the limit (a full mailbox) ends as a refusal; the session
    lives on."""
    reply = f"{code} {code // 100}.2.2 Mailbox full"
    sink.rcpt_replies = {"full@example.com": reply}
    transport = make_transport(sink)

    result = transport.send(make_envelope(("a@example.com", "full@example.com")))
    transport.send(make_envelope())

    assert result.refused == {"full@example.com": (code, reply[4:])}
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",), ("alice@example.com",)]
    assert sink.connections == 1


def test_other_4xx_refusal_of_one_recipient_is_reported_without_a_new_transaction(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """Greylisting (450) of one recipient while others accept: sent, that one refused."""
    sink.rcpt_replies = {"cc@example.com": "450 4.2.0 Greylisted"}

    result = make_transport(sink).send(make_envelope(("a@example.com", "cc@example.com")))

    assert result.refused == {"cc@example.com": (450, "4.2.0 Greylisted")}
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",)]


def test_data_command_refusal_is_permanent(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """A 554 reply to the DATA command raises PermanentSendError."""
    sink.data_command_reply = "554 5.5.1 No valid recipients"

    with pytest.raises(PermanentSendError) as info:
        make_transport(sink).send(make_envelope())

    assert (info.value.code, info.value.enhanced_code) == (554, "5.5.1")
    assert sink.messages == []


@pytest.mark.parametrize(
    ("reply", "error", "code", "enhanced"),
    [
        ("451 4.3.0 Local error in processing", TransientSendError, 451, "4.3.0"),
        ("452 4.3.1 Insufficient system storage", TransientSendError, 452, "4.3.1"),
        ("552 5.3.4 Message size exceeds fixed limit", PermanentSendError, 552, "5.3.4"),
        ("554 5.7.1 Message rejected as spam", PermanentSendError, 554, "5.7.1"),
    ],
)
def test_final_reply_after_data_is_mapped(
    sink: SmtpSink,
    make_transport: MakeTransport,
    reply: str,
    error: type[SendError],
    code: int,
    enhanced: str,
) -> None:
    """A failure reply after the message data maps to the error class of its reply class."""
    sink.data_reply = reply

    with pytest.raises(error) as info:
        make_transport(sink).send(make_envelope())

    assert type(info.value) is error
    assert (info.value.code, info.value.enhanced_code) == (code, enhanced)
    assert "end of DATA" in str(info.value)


def test_long_server_text_is_truncated(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """Server text kept in an exception is cut to a bounded length."""
    sink.rcpt_replies = {"alice@example.com": "550 5.1.1 " + "x" * 3000}

    with pytest.raises(PermanentSendError) as info:
        make_transport(sink).send(make_envelope())

    assert len(info.value.message) < 1100
    assert info.value.enhanced_code == "5.1.1"


# -- lost connections and timeouts -----------------------------------------------------------


def test_drop_after_data_is_unknown_outcome(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """A connection lost after the message was sent, before the reply, is an unknown outcome."""
    sink.drop_after_data = True

    with pytest.raises(UnknownSendOutcome) as info:
        make_transport(sink).send(make_envelope())

    assert info.value.code is None
    assert len(sink.dropped) == 1
    assert sink.messages == []


def test_slow_reply_before_data_times_out_as_transient(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A reply slower than the timeout before DATA raises a plain transient error in time."""
    sink.delays = {"RCPT": 10.0}
    transport = make_transport(sink, timeout=0.5)

    started = time.monotonic()
    with pytest.raises(TransientSendError) as info:
        transport.send(make_envelope())
    elapsed = time.monotonic() - started

    assert type(info.value) is TransientSendError
    assert info.value.code is None
    assert elapsed < 3.0


def test_slow_final_reply_times_out_as_unknown_outcome(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A final reply slower than the timeout raises UnknownSendOutcome in time."""
    sink.delays = {"DATA": 10.0}
    transport = make_transport(sink, timeout=0.5)

    started = time.monotonic()
    with pytest.raises(UnknownSendOutcome):
        transport.send(make_envelope())

    assert time.monotonic() - started < 3.0


def test_slow_greeting_times_out_within_connect_timeout(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A server that never greets fails the send within connect_timeout."""
    sink.delays = {"greeting": 10.0}
    transport = make_transport(sink, timeout=30.0, connect_timeout=0.5)

    started = time.monotonic()
    with pytest.raises(TransientSendError):
        transport.send(make_envelope())

    assert time.monotonic() - started < 3.0


def test_connection_refused_is_transient(make_transport: MakeTransport) -> None:
    """A refused TCP connection raises ServerUnavailable (transient) without a code."""
    transport = SmtpTransport(
        "127.0.0.1", free_port(), security="none", local_hostname="client.localhost"
    )

    with pytest.raises(TransientSendError) as info:
        transport.send(make_envelope())

    assert type(info.value) is ServerUnavailable
    assert info.value.code is None
    transport.close()


# -- replies that do not end (RELIABILITY.md, F1) -------------------------------------------

Handler = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def raw_server(handler: Handler) -> Iterator[tuple[str, int]]:
    """A loopback server that runs `handler(client, stop)` for one connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)  # close() does not wake accept(); a test that never connects
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            with client:
                client.settimeout(5)
                handler(client, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.close()
        thread.join(10)
        assert not thread.is_alive()


def smtp_handler(
    ehlo_reply: bytes,
    final_reply: bytes = b"250 queued\r\n",
    *,
    greeting: bytes = b"220 raw.localhost ESMTP\r\n",
    replies: dict[bytes, bytes] | None = None,
) -> Handler:
    """Just enough SMTP to reach the end of DATA, with the given EHLO and final replies.

    `replies` answers other commands by verb (``b"MAIL"``, ``b"RCPT"``, ``b"AUTH"``).
    """

    def handle(client: socket.socket, stop: threading.Event) -> None:
        with client.makefile("rb") as reader:
            client.sendall(greeting)
            while line := reader.readline():
                verb = line[:4].upper()
                if replies and verb in replies:
                    client.sendall(replies[verb])
                elif verb == b"EHLO":
                    client.sendall(ehlo_reply)
                elif verb == b"DATA":
                    client.sendall(b"354 go ahead\r\n")
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    client.sendall(final_reply)
                elif verb == b"QUIT":
                    client.sendall(b"221 bye\r\n")
                    return
                else:
                    client.sendall(b"250 OK\r\n")

    return handle


def multiline(count: int, width: int = 10) -> bytes:
    """A 250 reply of `count` lines of `width` characters each."""
    lines = [b"250-" + b"x" * width + b"\r\n"] * (count - 1)
    return b"".join(lines) + b"250 " + b"x" * width + b"\r\n"


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("greeting", ServerUnavailable),
        ("ehlo", ServerUnavailable),
        ("final reply", UnknownSendOutcome),
    ],
)
def test_trickled_endless_reply_fails_within_the_timeout(
    stage: str, error: type[SendError]
) -> None:
    """A reply trickled a byte at a time, each byte in time, never ending: one timeout."""
    with TrickleServer(stage, interval=0.02) as server:
        transport = SmtpTransport(
            server.host, server.port, security="none", timeout=0.5, local_hostname="client"
        )
        started = time.monotonic()
        with pytest.raises(SendError) as info:
            transport.send(make_envelope())
        elapsed = time.monotonic() - started
        assert server.trickling.is_set()
        transport.close()

    assert type(info.value) is error
    assert info.value.code is None
    assert "no complete reply within 0.5 s" in str(info.value)
    assert 0.5 <= elapsed < 2.0


def test_trickled_endless_line_fails_within_the_timeout() -> None:
    """One reply line that never ends, a byte at a time: one timeout, not one per byte."""

    def trickle(client: socket.socket, stop: threading.Event) -> None:
        client.sendall(b"220-")
        while not stop.wait(0.02):
            client.sendall(b"x")

    with raw_server(trickle) as (host, port):
        transport = SmtpTransport(host, port, security="none", timeout=0.5, local_hostname="c")
        started = time.monotonic()
        with pytest.raises(TransientSendError, match=r"greeting: .* no complete reply"):
            transport.send(make_envelope())
        elapsed = time.monotonic() - started
        transport.close()

    assert 0.5 <= elapsed < 2.0


@pytest.mark.parametrize(
    ("ehlo_reply", "final_reply", "error"),
    [
        (multiline(101), b"250 queued\r\n", ServerUnavailable),
        (multiline(20, width=4000), b"250 queued\r\n", ServerUnavailable),
        (multiline(3), multiline(5000), UnknownSendOutcome),
    ],
    ids=["ehlo-101-lines", "ehlo-80-KiB", "final-reply-5000-lines"],
)
def test_overlong_reply_is_given_up(
    ehlo_reply: bytes, final_reply: bytes, error: type[SendError]
) -> None:
    """A reply past 100 lines or 64 KiB ends the session: transient, or unknown after DATA."""
    with raw_server(smtp_handler(ehlo_reply, final_reply)) as (host, port):
        transport = SmtpTransport(host, port, security="none", timeout=5.0, local_hostname="c")
        with pytest.raises(SendError) as info:
            transport.send(make_envelope())
        transport.close()

    assert type(info.value) is error
    assert info.value.code is None
    assert "reply longer than 100 lines or 65536 bytes" in str(info.value)


@pytest.mark.parametrize(
    ("greeting", "ehlo_reply", "replies", "final_reply", "error"),
    [
        (b"220 " + b"x" * 9000 + b"\r\n", multiline(2), {}, b"250 queued\r\n", ServerUnavailable),
        (b"220 raw\r\n", b"250 " + b"x" * 9000 + b"\r\n", {}, b"250 queued\r\n", ServerUnavailable),
        (
            b"220 raw\r\n",
            multiline(2),
            {b"MAIL": b"250 " + b"x" * 9000 + b"\r\n"},
            b"250 queued\r\n",
            TransientSendError,
        ),
        (
            b"220 raw\r\n",
            multiline(2),
            {b"RCPT": b"250 " + b"x" * 9000 + b"\r\n"},
            b"250 queued\r\n",
            TransientSendError,
        ),
        (
            b"220 raw\r\n",
            multiline(2),
            {},
            b"250 2.0.0 Ok: queued as 4Xy " + b"x" * 9000 + b"\r\n",
            UnknownSendOutcome,
        ),
    ],
    ids=["greeting", "ehlo", "mail", "rcpt", "final-reply"],
)
def test_reply_line_past_8192_bytes_is_given_up_not_a_500(
    greeting: bytes,
    ehlo_reply: bytes,
    replies: dict[bytes, bytes],
    final_reply: bytes,
    error: type[SendError],
) -> None:
    """A reply line over smtplib's 8 KiB ends the session like any overrun, never as a 5xx."""
    handler = smtp_handler(ehlo_reply, final_reply, greeting=greeting, replies=replies)
    with raw_server(handler) as (host, port):
        transport = SmtpTransport(host, port, security="none", timeout=5.0, local_hostname="c")
        with pytest.raises(SendError) as info:
            transport.send(make_envelope())
        transport.close()

    assert type(info.value) is error
    assert info.value.code is None
    assert "reply line longer than 8192 bytes" in str(info.value)


def test_reply_of_100_lines_is_read_in_full() -> None:
    """The cap is on the 101st line: a 100-line EHLO reply is a normal one."""
    with raw_server(smtp_handler(multiline(100))) as (host, port):
        transport = SmtpTransport(host, port, security="none", timeout=5.0, local_hostname="c")
        assert transport.send(make_envelope()) == SendResult(refused={})
        transport.close()


def test_a_slow_reply_leaves_the_full_timeout_for_sending(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """Reading a reply shrinks the socket timeout; it is back to `timeout` afterwards."""
    sink.delays = {"MAIL": 0.3, "DATA": 0.3}
    transport = make_transport(sink, timeout=1.0)

    transport.send(make_envelope())

    session = transport._local.session
    assert session.sock.gettimeout() == 1.0
    assert session.timeout == 1.0


# -- authentication and TLS ------------------------------------------------------------------


def test_correct_credentials_log_in(auth_sink: SmtpSink, make_transport: MakeTransport) -> None:
    """With the right credentials the transport logs in and the message is accepted."""
    make_transport(auth_sink, username=USER, password=PASSWORD).send(make_envelope())

    [received] = auth_sink.messages
    assert received.authenticated_as == USER


def test_wrong_password_is_permanent_and_never_shown(
    auth_sink: SmtpSink, make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A 535 to AUTH is permanent; the password appears in no message, repr or log."""
    caplog.set_level(logging.DEBUG)
    transport = make_transport(auth_sink, username=USER, password=PASSWORD + "-wrong")

    with pytest.raises(PermanentSendError) as info:
        transport.send(make_envelope())

    error = info.value
    assert (error.code, error.enhanced_code) == (535, "5.7.8")
    assert "AUTH" in str(error)
    assert auth_sink.messages == []
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert_no_secret(
        *(str(e) for e in chain),
        *(repr(e) for e in chain),
        repr(transport),
        str(vars(transport)),
        caplog.text,
    )


def test_malformed_auth_challenge_is_server_unavailable(
    auth_sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A 334 challenge that is not base64 is the server's fault: unavailable, not permanent."""
    auth_sink.auth_reply = "334 abc"
    transport = make_transport(auth_sink, username=USER, password=PASSWORD)

    with pytest.raises(SendError) as info:
        transport.send(make_envelope())

    assert type(info.value) is ServerUnavailable
    assert info.value.code is None
    assert "AUTH" in str(info.value)
    assert_no_secret(info.value)
    assert auth_sink.messages == []
    # The half-done session was dropped: once the server behaves, the next send logs in.
    auth_sink.auth_reply = None
    transport.send(make_envelope())
    assert len(auth_sink.messages) == 1


def test_auth_not_offered_is_permanent(sink: SmtpSink, make_transport: MakeTransport) -> None:
    """Credentials for a server that offers no AUTH raise PermanentSendError."""
    transport = make_transport(sink, username=USER, password=PASSWORD)

    with pytest.raises(PermanentSendError, match="AUTH") as info:
        transport.send(make_envelope())

    assert_no_secret(str(info.value), repr(transport))
    assert sink.messages == []


def test_starttls_not_offered_fails_without_sending(
    auth_sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """security="starttls" against a server without STARTTLS fails before AUTH or MAIL."""
    transport = make_transport(auth_sink, security="starttls", username=USER, password=PASSWORD)

    with pytest.raises(PermanentSendError, match="STARTTLS") as info:
        transport.send(make_envelope())

    assert info.value.code is None
    assert auth_sink.auth_attempts == 0
    assert auth_sink.messages == []


needs_test_cert = pytest.mark.skipif(
    not SERVER_CERT.exists(), reason="aiosmtpd's test certificate is not installed"
)


@pytest.fixture
def starttls_sink() -> Iterator[SmtpSink]:
    with SmtpSink(tls_context=server_tls_context(), credentials=(USER, PASSWORD)) as server:
        yield server


@needs_test_cert
def test_starttls_upgrades_before_login_and_mail(
    starttls_sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """security="starttls" upgrades the session, then logs in and sends over TLS."""
    transport = make_transport(
        starttls_sink,
        security="starttls",
        ssl_context=client_tls_context(),
        username=USER,
        password=PASSWORD,
    )

    transport.send(make_envelope())
    transport.send(make_envelope())

    assert [(m.tls, m.authenticated_as) for m in starttls_sink.messages] == [(True, USER)] * 2
    assert starttls_sink.connections == 1


@needs_test_cert
def test_starttls_verifies_the_certificate_by_default(
    starttls_sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """Without an ssl_context, an untrusted certificate fails the send before AUTH or MAIL."""
    transport = make_transport(starttls_sink, security="starttls", username=USER, password=PASSWORD)

    with pytest.raises(TransientSendError, match="certificate verify failed") as info:
        transport.send(make_envelope())

    assert info.value.code is None
    assert starttls_sink.auth_attempts == 0
    assert starttls_sink.messages == []


@needs_test_cert
def test_starttls_checks_the_server_host_name(
    starttls_sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """A trusted certificate issued for another name is refused (the host name is checked)."""
    transport = make_transport(
        starttls_sink, security="starttls", ssl_context=client_tls_context(check_hostname=True)
    )

    with pytest.raises(TransientSendError, match="mismatch"):
        transport.send(make_envelope())

    assert starttls_sink.messages == []


@needs_test_cert
def test_implicit_tls_delivers(make_transport: MakeTransport) -> None:
    """security="tls" speaks TLS from the first byte and delivers."""
    with SmtpSink(implicit_tls=server_tls_context()) as server:
        transport = make_transport(server, security="tls", ssl_context=client_tls_context())

        transport.send(make_envelope())

        assert [m.tls for m in server.messages] == [True]


# -- input and configuration -----------------------------------------------------------------


def test_envelope_without_recipients_is_permanent(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """An envelope with no recipients fails permanently without connecting."""
    with pytest.raises(PermanentSendError, match="no recipients"):
        make_transport(sink).send(make_envelope(()))

    assert sink.connections == 0


def test_address_with_line_break_is_permanent(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """An envelope address with CR/LF fails permanently without connecting (no injection)."""
    envelope = make_envelope(("alice@example.com\r\nRCPT TO:<evil@example.com>",))

    with pytest.raises(PermanentSendError, match="control character"):
        make_transport(sink).send(envelope)

    assert sink.connections == 0


@pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("tls", 465), ("none", 25)])
def test_default_port_follows_security(security: str, port: int) -> None:
    """Without a port, the usual one for the security mode is used."""
    transport = SmtpTransport("mail.example.com", security=security)  # type: ignore[arg-type]

    assert transport.port == port


@pytest.mark.parametrize(
    "kwargs",
    [
        {"security": "ssl"},
        {"port": 0},
        {"timeout": 0},
        {"connect_timeout": -1.0},
        {"username": USER},
        {"password": PASSWORD},
        {"security": "none", "ssl_context": object()},
        # smtplib's AUTH is ASCII: found at every send, each mail was dead-lettered.
        {"username": USER, "password": PASSWORD + "é"},
        {"username": "usér", "password": PASSWORD},
    ],
    ids=[
        "security",
        "port",
        "timeout",
        "connect_timeout",
        "user-only",
        "password-only",
        "ctx",
        "non-ascii-password",
        "non-ascii-user",
    ],
)
def test_invalid_configuration_is_rejected(kwargs: dict[str, object]) -> None:
    """Bad constructor arguments raise ValueError, never echoing the password."""
    with pytest.raises(ValueError) as info:
        SmtpTransport("mail.example.com", **kwargs)  # type: ignore[arg-type]

    assert_no_secret(str(info.value))


def test_repr_hides_password() -> None:
    """repr() names host, port, security and user, never the password."""
    transport = SmtpTransport("mail.example.com", username=USER, password=PASSWORD)

    assert repr(transport) == (
        "SmtpTransport(host='mail.example.com', port=587, security='starttls', username='mailer')"
    )
    assert_no_secret(repr(transport), str(vars(transport)))


def test_tls_against_plain_server_is_transient(
    sink: SmtpSink, make_transport: MakeTransport
) -> None:
    """security="tls" against a plain-text server fails the handshake as a transient error."""
    transport = make_transport(sink, security="tls")

    with pytest.raises(TransientSendError) as info:
        transport.send(make_envelope())

    assert info.value.code is None
    assert sink.messages == []
