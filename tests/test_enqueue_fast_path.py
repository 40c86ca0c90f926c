"""The cheap paths of enqueue: one-mail statement, column-wise parameters, fast validation."""

from __future__ import annotations

import pickle
import re
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from mailoutbox import InvalidMail, Kind, Outbox, mail
from mailoutbox import operations as ops
from mailoutbox import statements as st
from mailoutbox.mail import PreparedMail, prepare
from mailoutbox.records import Payload, Recipient
from mailoutbox.schema import tables_for

from .factories import make_mail, row_counts
from .test_statements import DIALECT, sql

T = tables_for("mailoutbox")
SENDER = "Shop <noreply@example.com>"


def binds(statement: sa.ClauseElement) -> set[str]:
    return set(statement.compile(dialect=DIALECT).params)


def test_new_ids_are_distinct_version_7_uuids_in_time_order() -> None:
    """Delivery ids are RFC 9562 version 7: unique, ordered by creation time, real UUIDs."""
    before = time.time_ns() // 1_000_000
    ids = ops.time_ordered_uuids(2000)
    time.sleep(0.002)
    later = ops.time_ordered_uuids(1)[0]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for value in ids[:200]:
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert before <= value.int >> 80 <= after  # milliseconds since the epoch
        assert uuid.UUID(str(value)) == value
        assert hash(uuid.UUID(bytes=value.bytes)) == hash(value)
        assert pickle.loads(pickle.dumps(value)) == value
    assert all(value < later for value in ids)
    # The random part is random: not one shared tail, not zeros.
    assert len({value.int & ((1 << 62) - 1) for value in ids}) == 2000
    assert ops.time_ordered_uuids(0) == []


def test_one_mail_statement_skips_duplicates_and_reports_recipients_written() -> None:
    """The one-mail insert keeps ON CONFLICT DO NOTHING and returns no rows (row count only)."""
    statement = st.insert_enqueue_one(T)
    text = sql(statement)
    assert "ON CONFLICT (template_id, idempotency_key) DO NOTHING" in text
    assert text.endswith("ON true")  # the recipients insert, not a SELECT, comes last
    assert "FROM inserted_delivery" in text
    assert st.insert_enqueue_one(T) is statement


def test_one_mail_parameters_are_the_statements_binds() -> None:
    """enqueue_one_params fills exactly the bind parameters of insert_enqueue_one."""
    prepared = prepare(make_mail(cc=["c@example.com"]), default_sender=SENDER)
    params = ops.enqueue_one_params(prepared, uuid.uuid4())
    assert set(params) == binds(st.insert_enqueue_one(T))
    assert params["in_r_address"] == ["alice@example.com", "c@example.com"]
    assert params["in_r_kind"] == ["to", "cc"]
    assert params["in_headers"] == "[]"


def test_batch_parameters_are_the_statements_arrays_column_by_column() -> None:
    """enqueue_params fills every array of insert_enqueue, recipients flattened in order."""
    mails = [
        prepare(make_mail(to=["a@example.com", "b@example.com"]), default_sender=SENDER),
        prepare(make_mail(bcc=["d@example.com"], headers={"X-Tag": "x"}), default_sender=SENDER),
    ]
    batch = ops.enqueue_params(mails)
    assert set(batch.params) == binds(st.insert_enqueue(T))
    first, second = batch.delivery_ids
    assert batch.params["in_delivery_id"] == [first, second]
    assert batch.params["in_ordinal"] == [0, 1]
    assert batch.params["in_r_delivery_id"] == [first, first, second, second]
    assert batch.params["in_r_address"] == [
        "a@example.com",
        "b@example.com",
        "alice@example.com",
        "d@example.com",
    ]
    assert batch.params["in_r_kind"] == ["to", "to", "to", "bcc"]
    assert batch.params["in_r_position"] == [0, 1, 0, 1]
    assert batch.params["in_headers"] == ["[]", '[["X-Tag", "x"]]']
    assert first != second


def _statements(conn: sa.Connection) -> list[str]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    sa.event.listen(conn, "before_cursor_execute", record)
    return seen


def test_single_enqueue_is_one_statement_and_a_duplicate_one_more_read(
    engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """A new mail costs one statement; a duplicate adds only the lookup of the existing id."""
    with engine.begin() as conn:
        seen = _statements(conn)
        first = sync_outbox.enqueue(make_mail(idempotency_key="k"), connection=conn)
        assert len(seen) == 1
        again = sync_outbox.enqueue(make_mail(idempotency_key="k"), connection=conn)
        assert len(seen) == 3
        assert seen[1] == seen[0]
        conn.execute(sa.text("SELECT 1"))  # the transaction is still usable
    assert first.created and not again.created
    assert again.delivery_id == first.delivery_id
    assert row_counts(engine)["mail_payloads"] == 1
    assert row_counts(engine)["mail_recipients"] == 1


def test_enqueue_many_of_one_mail_takes_the_one_mail_statement(
    engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """A batch of one is written by the same statement as enqueue()."""
    with engine.begin() as conn:
        seen = _statements(conn)
        sync_outbox.enqueue(make_mail(), connection=conn)
        [result] = sync_outbox.enqueue_many([make_mail()], connection=conn)
    assert result.created
    assert seen[0] == seen[1]


def test_single_enqueue_stores_every_part(outbox: Outbox) -> None:
    """Subject, both bodies, sender, headers, schedule and recipients survive the one-mail path."""
    from datetime import datetime, timedelta, timezone

    send_at = datetime.now(timezone.utc) + timedelta(hours=1)
    result = outbox.enqueue(
        make_mail(
            to=["Zoë <z@example.com>"],
            cc=["c@example.com"],
            bcc=["b@example.com"],
            subject="Grüße",
            text="plain",
            html="<p>html</p>",
            reply_to=["r@example.com"],
            send_at=send_at,
            expires_at=send_at + timedelta(days=1),
        )
    )
    assert result.created
    delivery = outbox.get_delivery(result.delivery_id)
    assert delivery.next_attempt_at == send_at
    assert delivery.expires_at == send_at + timedelta(days=1)
    payload = outbox.get_payload(result.delivery_id)
    assert (payload.subject, payload.body, payload.html_body) == ("Grüße", b"plain", "<p>html</p>")
    assert list(payload.headers) == [("Reply-To", "r@example.com")]
    assert [(r.address, r.kind) for r in outbox.list_recipients(result.delivery_id)] == [
        ("Zoë <z@example.com>", Kind.TO),
        ("c@example.com", Kind.CC),
        ("b@example.com", Kind.BCC),
    ]


def test_store_single_mail_without_recipients_still_counts_as_created(
    engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """The row count is 0 without recipients; the lookup then recognises the proposed id."""
    bare = PreparedMail(
        template_id="t",
        idempotency_key="k",
        payload=Payload("text/plain", None, b"x", None, "a@example.com", ()),
        recipients=(),
        send_at=None,
        expires_at=None,
    )
    with engine.begin() as conn:
        [(delivery_id, created)] = sync_outbox.store.insert_enqueue(conn, [bare])
        [(again, created_again)] = sync_outbox.store.insert_enqueue(conn, [bare])
    assert created and not created_again
    assert again == delivery_id


# --- validation fast paths agree with the full checks -------------------------------------


@pytest.mark.parametrize("code", range(128))
def test_ascii_header_fast_path_refuses_exactly_what_the_pattern_refuses(code: int) -> None:
    """For ASCII text, the isprintable() shortcut and _HEADER_FORBIDDEN agree on every char."""
    value = f"a{chr(code)}b"
    if mail._HEADER_FORBIDDEN.search(value):
        with pytest.raises(InvalidMail):
            mail._check_header_text(value, "subject")
    else:
        assert mail._check_header_text(value, "subject") == value


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("plain ascii\r\n\ttext", False),
        ("nul \x00 in ascii", True),
        ("non-ascii ✓", False),
        ("non-ascii ✓ with nul \x00", True),
        ("lone surrogate \ud800", True),
    ],
)
def test_body_check_finds_nul_and_lone_surrogates(text: str, bad: bool) -> None:
    """The ASCII shortcut and the pattern together catch what the pattern alone caught."""
    assert mail._has_forbidden_body_char(text) is bad
    assert (mail._BODY_FORBIDDEN.search(text) is not None) is bad


def test_header_fast_path_still_bounds_length_and_type() -> None:
    """Long or non-string values still go through (and fail) the full checks."""
    with pytest.raises(InvalidMail, match="longer than"):
        mail._check_header_text("x" * (mail.MAX_HEADER_VALUE_LENGTH + 1), "subject")
    with pytest.raises(InvalidMail, match="must be a string"):
        mail._check_header_text(b"bytes", "subject")  # type: ignore[arg-type]


def test_recipients_keep_kind_order_and_field_names() -> None:
    """to, cc, bcc in that order; a bad address names its own field."""
    prepared = prepare(
        make_mail(to=["t@example.com"], cc=["c@example.com"], bcc=["b@example.com"]),
        default_sender=SENDER,
    )
    assert prepared.recipients == (
        Recipient("t@example.com", Kind.TO),
        Recipient("c@example.com", Kind.CC),
        Recipient("b@example.com", Kind.BCC),
    )
    for field_name in ("to", "cc", "bcc"):
        with pytest.raises(InvalidMail) as excinfo:
            prepare(make_mail(**{field_name: ["not an address"]}), default_sender=SENDER)
        assert excinfo.value.field == field_name


def test_one_mail_statement_compiles_its_recipient_position_from_ordinality() -> None:
    """Positions are 0-based like the batch statement's r_position."""
    text = str(st.insert_enqueue_one(T).compile(dialect=DIALECT))
    assert re.search(r"WITH ORDINALITY AS recipient_rows\(r_address, r_kind, r_ordinal\)", text)
    assert "recipient_rows.r_ordinal - 1" in text
