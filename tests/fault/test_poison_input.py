"""Scenario 6: hostile input at every Mail field and at the schema name (hypothesis).

Each generated mail is enqueued in a transaction of its own (rolled back at
the end). Either enqueue raises InvalidMail/ValueError, no row was written and
the caller's transaction is still usable; or the stored parts, rendered as the
worker renders them, parse back with no extra header and the same content.
Inputs: arbitrary Unicode (lone surrogates included), control characters,
CR/LF, NUL, U+2028/U+2029/U+0085, bidi and zero-width characters, strings that
look like encoded-words, very long strings, and wrong types.
"""

from __future__ import annotations

import email.policy
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formataddr, getaddresses, parseaddr
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mailoutbox
from mailoutbox import InvalidMail, Mail, Outbox, Status
from mailoutbox.render import render
from mailoutbox.schema import tables_for
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import Worker

from .harness import figures

SENDER = "noreply@example.com"  # the outbox fixture's default_sender
TABLES = ("mail_deliveries", "mail_payloads", "mail_recipients", "mail_attempts")
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NASTY = [
    "\r", "\n", "\r\n", "\x00", "\t", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028",
    "\u2029", "\u200b", "\u200e", "\u202e", "\ufeff", "\ufffd", "\U0010ffff", "\ud800",
    "\udfff", "=?utf-8?q?x?=", "=?", "?=", " ", "  ", '"', "\\", "<", ">", "@", ",", ";",
    ":", "(", ")", "[", "]", ".", "é", "ß", "日本", "😀", "👍🏽", "e\u0301", "Ǆ", "ﬁ",
]  # fmt: skip
nasty = st.lists(st.sampled_from(NASTY) | st.text(max_size=4), max_size=12).map("".join)
long = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(300, 4000))
# st.characters() with no filter draws any code point, lone surrogates included.
anything = st.text(st.characters(), max_size=40)
texts = anything | nasty | long
wrong_types = st.sampled_from([None, 0, 1.5, b"bytes", ["list"], {"k": "v"}])


def display(name: str, addr: str) -> str:
    """`Name <addr>` as formataddr writes it (which cannot encode lone surrogates)."""
    try:
        return formataddr((name, addr))
    except UnicodeError:
        return f'"{name}" <{addr}>'


def addresses(domain: str) -> st.SearchStrategy[Any]:
    """Address fields: fuzzed display names, fuzzed raw strings, lists and non-lists."""
    named = texts.map(lambda name: display(name, f"x@{domain}"))
    one = named | texts | st.just(f"plain@{domain}")
    return st.lists(one, max_size=3) | one | wrong_types


# field -> strategy for its value; the rest of the Mail stays valid.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "template_id": texts | wrong_types,
    "idempotency_key": texts | wrong_types,
    "subject": texts | st.none() | wrong_types,
    "text": texts | wrong_types,
    "html": texts | wrong_types,
    "to": addresses("to.example.com"),
    "cc": addresses("cc.example.com"),
    "bcc": addresses("bcc.example.com"),
    "reply_to": addresses("reply.example.com"),
    "sender": addresses("from.example.com"),
    "headers": st.dictionaries(texts | st.just("X-Fuzz"), texts, max_size=2)
    | st.lists(st.tuples(texts, texts), max_size=2)
    | wrong_types,
}
DATES = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)) | st.datetimes(
    timezones=st.builds(
        timezone,
        st.timedeltas(
            min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
        ),
    )
)


def valid(**overrides: Any) -> Mail:
    values: dict[str, Any] = {
        "template_id": "poison",
        "idempotency_key": f"k-{uuid.uuid4()}",
        "to": ["to@example.com"],
        "subject": "Hello",
        "text": "Hi",
    }
    values.update(overrides)
    if "html" in overrides:
        values["text"] = None
    return Mail(**values)


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as connection:
        yield connection


def row_counts(conn: sa.Connection) -> list[int]:
    return [
        conn.execute(sa.text(f"SELECT count(*) FROM mailoutbox.{t}")).scalar_one() for t in TABLES
    ]


def enqueue_or_reject(outbox: Outbox, conn: sa.Connection, mail: Mail) -> uuid.UUID | None:
    """Enqueue in a fresh transaction left open; None if rejected the allowed way."""
    before = row_counts(conn)
    try:
        return outbox.enqueue(mail, connection=conn).delivery_id
    except (InvalidMail, ValueError):
        # Nothing written, and the caller's transaction is still usable.
        assert row_counts(conn) == before
        return None


def as_sent(text: str) -> str:
    """What a text part reads back as: CRLF line breaks, ending with one unless empty."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n")


def as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def decoded(name: str) -> str:
    if "=?" not in name:
        return name
    try:
        return str(make_header(decode_header(name)))
    except Exception:  # noqa: BLE001 - undecodable stays as written
        return name


def same_name(parsed: str, given: str) -> bool:
    # A display name is a phrase: whitespace is only a separator in it.
    return parsed.split() == decoded(given).split()


def check_round_trip(
    outbox: Outbox, conn: sa.Connection, delivery_id: uuid.UUID, mail: Mail
) -> None:
    """Render the stored delivery as the worker does and compare it with `mail`."""
    store = outbox.store
    delivery = store.get_delivery(conn, delivery_id)
    assert delivery is not None
    assert (delivery.template_id, delivery.idempotency_key) == (
        mail.template_id,
        mail.idempotency_key,
    )
    payload = store.get_payload(conn, delivery_id)
    assert payload is not None
    recipients = store.list_recipients(conn, delivery_id)
    envelope = render(delivery_id, payload, recipients, date=datetime.now(timezone.utc))
    data = envelope.message
    # Wire format: 7-bit, CRLF lines of at most 998 octets.
    assert data.isascii()
    lines = data.split(b"\r\n")
    assert lines[-1] == b"" and all(len(x) <= 998 for x in lines)
    assert not any(b"\r" in x or b"\n" in x for x in lines)
    message = BytesParser(policy=email.policy.default).parsebytes(data)
    assert not message.defects, message.defects

    to, cc, bcc, reply_to = (as_list(v) for v in (mail.to, mail.cc, mail.bcc, mail.reply_to))
    extra = list(mail.headers.items()) if isinstance(mail.headers, dict) else list(mail.headers)
    # No To without to-recipients when there is a Cc; "undisclosed-recipients" if neither.
    expected = ["from", *(["to"] if to or not cc else []), *(["cc"] if cc else [])]
    expected += ["subject"] if mail.subject is not None else []
    expected += ["date", "message-id", "mime-version"]
    expected += ["reply-to"] if reply_to else []
    expected += [name.lower() for name, _ in extra]
    expected += ["content-type", "content-transfer-encoding"]
    # No extra header: exactly these, in this order.
    assert [k.lower() for k in message] == expected

    raw = BytesParser(policy=email.policy.compat32).parsebytes(data)

    def check_addresses(header: str, given: list[str]) -> None:
        # Display names are read from the raw header with email.header.decode_header:
        # CPython's address parser (before gh-128110) puts a space between adjacent
        # encoded-words, which would garble long names that render split correctly.
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(raw[header]))
        parsed = getaddresses([unfolded])
        assert len(parsed) == len(given)
        for (got_name, got_addr), value in zip(parsed, given, strict=True):
            name, addr = parseaddr(value)
            assert got_addr == addr
            assert same_name(decoded(got_name), name)

    check_addresses("From", [mail.sender or SENDER])
    if to:
        check_addresses("To", to)
    if cc:
        check_addresses("Cc", cc)
    if reply_to:
        check_addresses("Reply-To", reply_to)
    for value in bcc:
        assert parseaddr(value)[1].encode() not in data
    assert message.get("Subject") == mail.subject
    for lowered in {name.lower() for name, _ in extra}:
        # A header given twice is sent twice, in order (message[name] is only the first).
        given = [value for name, value in extra if name.lower() == lowered]
        got = message.get_all(lowered)
        assert got is not None and len(got) == len(given)
        for read, value in zip(got, given, strict=True):
            # A plain value's leading spaces read back as folding whitespace.
            assert read in (value, value.lstrip(" "))
    body = message.get_body(("plain", "html"))
    assert body is not None
    assert body.get_content() == as_sent(mail.text if mail.text is not None else mail.html)  # type: ignore[arg-type]
    want = [parseaddr(a)[1] for a in to + cc + bcc]
    assert set(envelope.recipients) == set(want)


@pytest.mark.parametrize("field", list(FIELDS))
def test_each_mail_field_rejects_or_round_trips(
    field: str, outbox: Outbox, conn: sa.Connection
) -> None:
    seen = {"accepted": 0, "rejected": 0}

    @PROPERTY
    @given(value=FIELDS[field])
    # Found by hypothesis: text a reader would take for an RFC 2047 encoded-word.
    @example(value=display("\u200b=?utf-8?q?x?=", "x@example.com"))
    @example(value={"X-Fuzz": "=??Q??="})
    @example(value=[("X-Fuzz", ""), ("x-fuzz", "0")])
    def prop(value: Any) -> None:
        mail = valid(**{field: value})
        with conn.begin():
            delivery_id = enqueue_or_reject(outbox, conn, mail)
            if delivery_id is None:
                seen["rejected"] += 1
            else:
                seen["accepted"] += 1
                check_round_trip(outbox, conn, delivery_id, mail)
            conn.rollback()

    prop()
    figures(f"poison {field}", **seen)


@PROPERTY
@given(
    subject=texts | st.none(),
    text=texts,
    to=addresses("to.example.com"),
    cc=addresses("cc.example.com"),
    headers=st.dictionaries(texts, texts, max_size=2),
)
def test_everything_hostile_at_once(
    outbox: Outbox, conn: sa.Connection, subject: Any, text: Any, to: Any, cc: Any, headers: Any
) -> None:
    mail = valid(subject=subject, text=text, to=to, cc=cc, headers=headers)
    with conn.begin():
        delivery_id = enqueue_or_reject(outbox, conn, mail)
        if delivery_id is not None:
            check_round_trip(outbox, conn, delivery_id, mail)
        conn.rollback()


@PROPERTY
@given(subject=texts, body=texts)
def test_messages_from_email_message_reject_or_round_trip(
    outbox: Outbox, conn: sa.Connection, subject: str, body: str
) -> None:
    msg = EmailMessage()
    try:
        msg["From"] = SENDER
        msg["To"] = "to@example.com"
        msg["Subject"] = subject
        msg.set_content(body)
    except (ValueError, TypeError):
        return  # the email package refused it first
    mail = Mail.from_message(msg, template_id="poison", idempotency_key=f"k-{uuid.uuid4()}")
    with conn.begin():
        delivery_id = enqueue_or_reject(outbox, conn, mail)
        if delivery_id is not None:
            payload = outbox.store.get_payload(conn, delivery_id)
            assert payload is not None
            recipients = outbox.store.list_recipients(conn, delivery_id)
            data = render(delivery_id, payload, recipients).message
            parsed = BytesParser(policy=email.policy.default).parsebytes(data)
            assert [k.lower() for k in parsed].count("subject") == 1
            assert parsed["Subject"] == msg["Subject"]
            part = parsed.get_body(("plain",))
            assert part is not None
            original = msg.get_content().replace("\r\n", "\n")
            assert part.get_content().replace("\r\n", "\n") == original
        conn.rollback()


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
def test_dates_reject_or_round_trip(field: str, outbox: Outbox, conn: sa.Connection) -> None:
    @PROPERTY
    @given(when=DATES)
    def prop(when: datetime) -> None:
        mail = valid(**{field: when})
        with conn.begin():
            delivery_id = enqueue_or_reject(outbox, conn, mail)
            if delivery_id is not None:
                stored = conn.execute(
                    sa.text(
                        f"SELECT {'next_attempt_at' if field == 'send_at' else field}"
                        " FROM mailoutbox.mail_deliveries WHERE delivery_id = :i"
                    ),
                    {"i": delivery_id},
                ).scalar_one()
                assert stored == when
            conn.rollback()

    prop()


def test_lone_surrogates_are_invalid_mail(outbox: Outbox, conn: sa.Connection) -> None:
    cases: dict[str, dict[str, Any]] = {
        "template_id": {"template_id": "a\ud800"},
        "idempotency_key": {"idempotency_key": "a\ud800"},
        "subject": {"subject": "a\ud800"},
        "text": {"text": "a\ud800"},
        "to": {"to": ["A\udfff <a@example.com>"]},
        "headers": {"headers": {"X-A": "\ud800"}},
    }
    wrong = {}
    for field, overrides in cases.items():
        with conn.begin():
            try:
                outbox.enqueue(valid(**overrides), connection=conn)
            except InvalidMail as exc:
                # Header fields are named "header <name>" by the validation.
                if not str(exc.field).startswith(field.rstrip("s")):
                    wrong[field] = f"InvalidMail(field={exc.field!r})"
            except ValueError as exc:
                wrong[field] = type(exc).__name__
            else:
                wrong[field] = "accepted"
            conn.rollback()
    assert not wrong, wrong


@settings(max_examples=200, deadline=None, database=None)
@given(name=texts | wrong_types)
def test_schema_names_reject_or_are_plain_identifiers(name: Any) -> None:
    engine = sa.create_engine("postgresql+psycopg://u@localhost/db")  # never connects
    try:
        try:
            Outbox(engine, schema=name)
        except (InvalidMail, ValueError):
            return
        except TypeError:
            # A name that is no string at all is a programming error: TypeError will do.
            assert not isinstance(name, str)
            return
        # Accepted: a plain lower-case identifier, which no statement needs to escape.
        assert isinstance(name, str)
        assert name.isascii() and name.isidentifier() and name == name.lower()
        assert len(name) <= 63
        tables = tables_for(name)
        assert tables.deliveries.schema == name
    finally:
        engine.dispose()


def end_to_end(db_url: sa.URL, schema: str) -> None:
    """Migrate into `schema`, enqueue, send: the schema works."""
    engine = sa.create_engine(db_url)
    try:
        mailoutbox.migrate(engine, schema=schema)
        outbox = Outbox(engine, schema=schema, default_sender=SENDER)
        enq = outbox.enqueue(valid())
        worker = Worker(outbox, MemoryTransport(), name="schema")
        assert worker.tick().sent == 1
        worker.close()
        assert outbox.get_delivery(enq.delivery_id).status is Status.SENT
    finally:
        engine.dispose()


@pytest.mark.parametrize("schema", ["select", "user", "_", "a" * 52])
def test_awkward_valid_schema_names_work_end_to_end(schema: str, db_url: sa.URL) -> None:
    """Reserved words, a bare underscore and a long name: migrate, enqueue, send."""
    end_to_end(db_url, schema)


def longest_accepted_schema_name() -> str:
    engine = sa.create_engine("postgresql+psycopg://u@localhost/db")  # never connects
    try:
        for n in range(100, 0, -1):
            try:
                Outbox(engine, schema="a" * n)
            except InvalidMail:
                continue
            return "a" * n
    finally:
        engine.dispose()
    raise AssertionError("no schema name accepted")


def test_the_longest_accepted_schema_name_works(db_url: sa.URL) -> None:
    end_to_end(db_url, longest_accepted_schema_name())
