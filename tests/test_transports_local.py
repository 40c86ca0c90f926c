"""MemoryTransport, FileTransport and NullTransport."""

from __future__ import annotations

import email
import email.policy
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from mailoutbox.errors import PermanentSendError, TransientSendError
from mailoutbox.transports import (
    Envelope,
    FileTransport,
    MemoryTransport,
    NullTransport,
    SendResult,
    SmtpTransport,
    Transport,
    close_transport,
)


def make_envelope(subject: str = "Hello") -> Envelope:
    delivery_id = uuid.uuid4()
    message_id = f"<{delivery_id}@example.com>"
    message = (
        "From: noreply@example.com\r\nTo: alice@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n"
    ).encode()
    return Envelope(
        delivery_id=delivery_id,
        sender="noreply@example.com",
        recipients=("alice@example.com", "hidden@example.com"),
        message=message,
        message_id=message_id,
    )


def send_from_threads(send: Callable[[Envelope], object], threads: int, each: int) -> None:
    barrier = threading.Barrier(threads)

    def run() -> None:
        barrier.wait(timeout=5)
        for _ in range(each):
            send(make_envelope())

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)


@pytest.mark.parametrize(
    "transport",
    [MemoryTransport(), NullTransport(), FileTransport("unused"), SmtpTransport("localhost")],
    ids=lambda t: type(t).__name__,
)
def test_every_transport_satisfies_the_protocol(transport: object) -> None:
    """Each shipped transport is a Transport."""
    assert isinstance(transport, Transport)


# -- MemoryTransport -------------------------------------------------------------------------


def test_memory_transport_records_envelopes_in_order() -> None:
    """send() appends each envelope to .sent, in call order, and returns None."""
    transport = MemoryTransport()
    first, second = make_envelope("one"), make_envelope("two")

    results = [transport.send(first), transport.send(second)]

    assert results == [None, None]
    assert transport.sent == [first, second]


def test_memory_transport_returns_the_handler_result() -> None:
    """A handler's SendResult is what send() returns; the envelope is recorded."""
    result = SendResult(refused={"hidden@example.com": (550, "5.1.1 No such user")})
    transport = MemoryTransport(handler=lambda envelope: result)
    envelope = make_envelope()

    assert transport.send(envelope) is result
    assert transport.sent == [envelope]


@pytest.mark.parametrize(
    "error", [TransientSendError(451, "try later"), PermanentSendError(550, "no such user")]
)
def test_memory_transport_handler_can_raise(error: Exception) -> None:
    """A handler's send error propagates; the envelope goes to .failed, not .sent."""

    def handler(envelope: Envelope) -> SendResult | None:
        raise error

    transport = MemoryTransport(handler=handler)
    envelope = make_envelope()

    with pytest.raises(type(error)) as info:
        transport.send(envelope)

    assert info.value is error
    assert transport.sent == []
    assert transport.failed == [envelope]


def test_memory_transport_handler_sees_each_envelope() -> None:
    """The handler is called with the envelope being sent."""
    seen: list[Envelope] = []
    transport = MemoryTransport(handler=lambda envelope: seen.append(envelope))
    envelope = make_envelope()

    transport.send(envelope)

    assert seen == [envelope]


def test_memory_transport_clear_forgets_everything() -> None:
    """clear() empties .sent and .failed."""

    def handler(envelope: Envelope) -> None:
        raise TransientSendError(None, "down")

    transport = MemoryTransport()
    transport.send(make_envelope())
    transport.handler = handler
    with pytest.raises(TransientSendError):
        transport.send(make_envelope())

    transport.clear()

    assert transport.sent == []
    assert transport.failed == []


def test_memory_transport_is_thread_safe() -> None:
    """Concurrent sends from many threads are all recorded."""
    transport = MemoryTransport()

    send_from_threads(transport.send, threads=8, each=250)

    assert len(transport.sent) == 2000
    assert len({e.delivery_id for e in transport.sent}) == 2000


# -- FileTransport ---------------------------------------------------------------------------


def test_file_transport_writes_a_parseable_eml(tmp_path: Path) -> None:
    """Each message lands in <delivery_id>.eml as its exact bytes, readable as e-mail."""
    transport = FileTransport(tmp_path / "outbox" / "nested")
    envelope = make_envelope("Welcome")

    assert transport.send(envelope) is None

    path = tmp_path / "outbox" / "nested" / f"{envelope.delivery_id}.eml"
    assert transport.path_for(envelope) == path
    assert path.read_bytes() == envelope.message
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Welcome"
    assert parsed["Message-ID"] == envelope.message_id
    assert parsed.get_content().strip() == "Grüße"


def test_file_transport_leaves_no_temporary_files(tmp_path: Path) -> None:
    """Only the .eml files remain after sending; the temporary files are renamed away."""
    transport = FileTransport(tmp_path)
    envelopes = [make_envelope() for _ in range(3)]

    for envelope in envelopes:
        transport.send(envelope)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{e.delivery_id}.eml" for e in envelopes
    )


def test_file_transport_replaces_the_file_of_a_retried_delivery(tmp_path: Path) -> None:
    """Sending the same delivery again replaces its file."""
    transport = FileTransport(tmp_path)
    envelope = make_envelope("first")
    transport.send(envelope)
    retried = Envelope(
        delivery_id=envelope.delivery_id,
        sender=envelope.sender,
        recipients=envelope.recipients,
        message=envelope.message.replace(b"first", b"second"),
        message_id=envelope.message_id,
    )

    transport.send(retried)

    assert transport.path_for(envelope).read_bytes() == retried.message
    assert len(list(tmp_path.iterdir())) == 1


def test_file_transport_unwritable_directory_is_transient(tmp_path: Path) -> None:
    """A directory that cannot be created raises TransientSendError."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    transport = FileTransport(blocker / "outbox")

    with pytest.raises(TransientSendError, match="cannot write"):
        transport.send(make_envelope())


def test_file_transport_is_thread_safe(tmp_path: Path) -> None:
    """Concurrent sends each produce their own complete file."""
    transport = FileTransport(tmp_path)

    send_from_threads(transport.send, threads=4, each=25)

    files = list(tmp_path.iterdir())
    assert len(files) == 100
    assert all(f.suffix == ".eml" and f.read_bytes().endswith(b"\r\n") for f in files)


# -- NullTransport ---------------------------------------------------------------------------


def test_null_transport_counts_and_discards() -> None:
    """send() returns None and bumps .count."""
    transport = NullTransport()

    results = [transport.send(make_envelope()) for _ in range(3)]

    assert results == [None, None, None]
    assert transport.count == 3


def test_null_transport_counts_across_threads() -> None:
    """Concurrent sends are all counted."""
    transport = NullTransport()

    send_from_threads(transport.send, threads=8, each=500)

    assert transport.count == 4000


@pytest.mark.parametrize("transport", [MemoryTransport(), NullTransport()])
def test_local_transports_can_be_closed(transport: object) -> None:
    """close_transport() accepts the local transports (their close() is a no-op)."""
    close_transport(transport)
