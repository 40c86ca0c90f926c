"""Statement builders: compiled shape (pure) and the query plans of the claim and the
queue-health read (EXPLAIN)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from mailoutbox import Outbox
from mailoutbox import statements as st
from mailoutbox.direct import direct
from mailoutbox.schema import Tables, tables_for

from .factories import make_mail

T = tables_for("mailoutbox")
DIALECT: sa.Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]


def sql(statement: sa.ClauseElement) -> str:
    return " ".join(str(statement.compile(dialect=DIALECT)).split())


def test_claim_skips_locked_rows_in_due_order() -> None:
    """The claim locks with SKIP LOCKED, orders by next_attempt_at and excludes handled ids."""
    text = sql(st.claim_due(T, 100))
    assert "FOR UPDATE SKIP LOCKED" in text
    assert "ORDER BY mailoutbox.mail_deliveries.next_attempt_at" in text
    assert "!= all(%(exclude)s::UUID[])" in text
    assert "next_attempt_at <= now()" in text


def test_claim_status_filter_is_literal_so_the_partial_index_applies() -> None:
    """Statuses are SQL literals matching the partial indexes' predicates, not bind parameters."""
    text = sql(st.claim_due(T, 100))
    assert "status IN ('pending', 'retrying')" in text
    assert "status = 'sending'" in text


def test_claim_returns_its_columns_in_the_order_rows_are_unpacked() -> None:
    """operations.claimed_from_row unpacks claim rows by position: the order must agree."""
    assert [c.name for c in st.claim_due(T, 100).selected_columns] == list(st.CLAIM_RESULT)


def test_completion_is_fenced_by_claim_token_and_found_by_primary_key() -> None:
    """Completion matches only the current lease holder's rows, looked up by id."""
    text = sql(st.complete_claimed(T))
    assert "mail_deliveries.claim_token = completion_input.claim_token" in text
    assert "mail_deliveries.delivery_id = any(%(in_delivery_id)s::UUID[])" in text


def test_builders_are_built_once_per_schema() -> None:
    """Statements are cached per schema, and other schemas get their own.

    A builder that lost its cache (a decorator moved onto a helper by an edit) cost
    enqueue_many half its throughput: SQLAlchemy then compiles the statement anew
    at every call."""
    assert st.claim_due(T, 100) is st.claim_due(T, 100)
    for build in (
        st.insert_enqueue,
        st.insert_enqueue_one,
        st.select_existing_ids,
        st.complete_claimed,
        st.release_claimed,
        st.select_queue_health,
        st.resend_unless_sent_or_sending,
        st.cancel_if_waiting,
        st.purge_terminal_batch,
    ):
        assert build(T) is build(T), build.__name__
    other = tables_for("other_schema")
    assert "other_schema.mail_deliveries" in sql(st.claim_due(other, 100))


def _fill_with_sent_history(conn: sa.Connection) -> None:
    """50,000 sent deliveries, one in a thousand pending and due; statistics fresh."""
    conn.execute(
        sa.text(
            "INSERT INTO mailoutbox.mail_payloads (payload_id, content_type, body, sender)"
            " VALUES ('00000000-0000-0000-0000-000000000001', 'text/plain', 'x',"
            " 'a@example.com')"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO mailoutbox.mail_deliveries (delivery_id, template_id, idempotency_key,"
            " status, payload_id, created_at, sent_at)"
            " SELECT gen_random_uuid(), 't', 'k' || i, CASE WHEN i % 1000 = 0 THEN 'pending'"
            " ELSE 'sent' END, '00000000-0000-0000-0000-000000000001', now(), now()"
            " FROM generate_series(1, 50000) AS i"
        )
    )
    conn.execute(
        sa.text(
            "UPDATE mailoutbox.mail_deliveries SET next_attempt_at = now() WHERE status = 'pending'"
        )
    )
    conn.execute(sa.text("ANALYZE mailoutbox.mail_deliveries"))


def _explain(conn: sa.Connection, statement: sa.ClauseElement, params: dict[str, object]) -> str:
    compiled = statement.compile(dialect=conn.dialect)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.execute("EXPLAIN " + compiled.string, compiled.construct_params(params))
    plan = "\n".join(row[0] for row in cursor.fetchall())
    cursor.close()
    return plan


def test_claim_query_uses_its_partial_index_on_a_large_history(engine: sa.Engine) -> None:
    """With many sent rows, EXPLAIN shows the claim reading its two partial indexes."""
    with engine.begin() as conn:
        _fill_with_sent_history(conn)
        params = {"worker": "w", "lease_seconds": 60.0, "exclude": [], "token": uuid.uuid4()}
        plan = _explain(conn, st.claim_due(T, 100), params)
    assert "mail_deliveries_due_idx" in plan, plan
    assert "mail_deliveries_leased_idx" in plan, plan
    assert "Seq Scan on mail_deliveries" not in plan, plan


@pytest.mark.parametrize(
    "statement", [st.select_queue_health, st.count_active], ids=["queue_health", "count_active"]
)
def test_metrics_reads_only_the_partial_indexes_on_a_large_history(
    engine: sa.Engine, statement: Callable[[Tables], sa.ClauseElement]
) -> None:
    """Every metrics scrape (and `mailoutbox status`) runs these: they must not scan the
    sent history. They did: at a million sent rows, queue_health took 91 ms against
    0.3 ms, and counting all six states 160-210 ms."""
    with engine.begin() as conn:
        _fill_with_sent_history(conn)
        plan = _explain(conn, statement(T), {})
    assert "mail_deliveries_due_idx" in plan, plan
    assert "mail_deliveries_leased_idx" in plan, plan
    assert "Seq Scan on mail_deliveries" not in plan, plan


def test_the_prepared_claim_is_planned_once_not_at_every_claim(
    db_url: sa.URL, sync_outbox: Outbox
) -> None:
    """PostgreSQL settles on one generic plan for the claim instead of planning each batch.

    The batch size is written into the statement: with a bound LIMIT the generic
    plan was costed for an unknown LIMIT, never won, and every claim was planned
    again (0.6-0.7 ms of the server's time per batch).
    """
    # A backlog of 20,000, as the benchmark drains: against it a generic plan costed
    # for an unknown LIMIT looks dearer than a plan for a LIMIT of 100.
    for _ in range(20):
        sync_outbox.enqueue_many([make_mail() for _ in range(1_000)])
    with sync_outbox.engine.connect() as conn:
        conn.execute(sa.text("ANALYZE mailoutbox.mail_deliveries"))
        conn.commit()
    engine = sa.create_engine(db_url, pool_size=1, max_overflow=0)
    try:
        with direct(engine, autocommit=True) as conn:
            # psycopg prepares a statement at its 6th execution; PostgreSQL plans the
            # first five executions of a prepared statement for their parameters.
            for _ in range(14):
                claimed = sync_outbox.store.claim_due(conn, limit=100, worker="w", lease_seconds=60)
                assert len(claimed) == 100
            cursor = conn.driver.cursor()
            cursor.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%expired_lease%'"
            )
            [(generic, custom)] = cursor.fetchall()
            cursor.close()
    finally:
        engine.dispose()
    assert (generic, custom) == (4, 5)


def test_public_contract_names_import_from_the_package() -> None:
    """Every name DESIGN.md's public contract lists is importable from mailoutbox."""
    import mailoutbox

    names = [
        "Outbox",
        "Mail",
        "Enqueued",
        "Delivery",
        "Attempt",
        "DeadLetter",
        "Page",
        "Status",
        "Worker",
        "TickReport",
        "RetryPolicy",
        "Transport",
        "Envelope",
        "SendResult",
        "SmtpTransport",
        "MemoryTransport",
        "MailOutboxError",
        "InvalidMail",
        "DeliveryNotFound",
        "ResendOnSent",
        "TransientSendError",
        "PermanentSendError",
        "AsyncOutbox",
        "AsyncWorker",
        "migrate",
    ]
    missing = [n for n in names if not hasattr(mailoutbox, n)]
    assert missing == []
    assert set(names) <= set(mailoutbox.__all__) | {"migrate"}
