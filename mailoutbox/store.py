"""Executes the statements of statements.py on a caller's Connection (sync).

The store never begins, commits or rolls back: transaction scope belongs to
its caller (the Outbox facade, the worker, or the host application). Row ->
record mapping lives here as pure functions that the async store reuses.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import statements as st
from .mail import PreparedMail
from .records import (
    Attempt,
    ClaimedDelivery,
    Completion,
    DeadLetter,
    Delivery,
    Payload,
    Recipient,
)
from .schema import Kind, Outcome, Status, Tables, tables_for

# --- parameters (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class EnqueueBatch:
    """The array parameters of one insert_enqueue execution, and the ids it proposes."""

    params: dict[str, list[Any]]
    delivery_ids: list[uuid.UUID]


def enqueue_params(mails: Sequence[PreparedMail]) -> EnqueueBatch:
    delivery_ids = [uuid.uuid4() for _ in mails]
    params: dict[str, list[Any]] = {name: [] for name, _ in st.ENQUEUE_MAIL_ARRAYS}
    params.update({name: [] for name, _ in st.ENQUEUE_RECIPIENT_ARRAYS})
    for delivery_id, mail in zip(delivery_ids, mails, strict=False):
        p = mail.payload
        for name, value in (
            ("delivery_id", delivery_id),
            ("template_id", mail.template_id),
            ("idempotency_key", mail.idempotency_key),
            ("payload_id", uuid.uuid4()),
            ("send_at", mail.send_at),
            ("expires_at", mail.expires_at),
            ("content_type", p.content_type),
            ("subject", p.subject),
            ("body", p.body),
            ("html_body", p.html_body),
            ("sender", p.sender),
            ("headers", json.dumps([list(h) for h in p.headers])),
        ):
            params[name].append(value)
        for position, recipient in enumerate(mail.recipients):
            params["r_delivery_id"].append(delivery_id)
            params["r_address"].append(recipient.address)
            params["r_kind"].append(recipient.kind.value)
            params["r_position"].append(position)
    return EnqueueBatch(_array_params(params), delivery_ids)


def completion_params(completions: Sequence[Completion]) -> dict[str, list[Any]]:
    params: dict[str, list[Any]] = {name: [] for name, _ in st.COMPLETION_ARRAYS}
    for c in completions:
        a = c.attempt
        for name, value in (
            ("delivery_id", c.delivery_id),
            ("claim_token", c.claim_token),
            ("status", Status(c.status).value),
            ("retry_delay", max(0.0, float(c.retry_delay_seconds))),
            ("reason", c.reason),
            ("outcome", None if a is None else Outcome(a.outcome).value),
            ("duration", 0.0 if a is None else max(0.0, a.duration_seconds)),
            ("error", "" if a is None else a.error),
            ("error_class", None if a is None else a.error_class),
            ("smtp_code", None if a is None else a.smtp_code),
            ("smtp_enhanced_code", None if a is None else a.smtp_enhanced_code),
            ("refused", None if a is None or a.refused is None else json.dumps(a.refused)),
            ("worker", c.worker),
        ):
            params[name].append(value)
    return _array_params(params)


def _array_params(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {st.array_param(name): values for name, values in columns.items()}


# --- rows -> records (pure) ---------------------------------------------------------------


def delivery_from_row(row: Any) -> Delivery:
    m = row._mapping
    return Delivery(
        **{name: m[name] for name in st.DELIVERY_COLUMNS if name != "status"},
        status=Status(m["status"]),
    )


def attempt_from_row(row: Any) -> Attempt:
    m = row._mapping
    values = {name: m[name] for name in st.ATTEMPT_COLUMNS}
    values["outcome"] = Outcome(values["outcome"])
    return Attempt(**values)


def dead_letter_from_row(row: Any) -> DeadLetter:
    m = row._mapping
    return DeadLetter(m["dead_letter_id"], m["delivery_id"], m["archived_at"], m["reason"])


def payload_from_row(row: Any) -> Payload:
    m = row._mapping
    return Payload(
        content_type=m["content_type"],
        subject=m["subject"],
        body=bytes(m["body"]),
        html_body=m["html_body"],
        sender=m["sender"],
        headers=tuple((str(n), str(v)) for n, v in m["headers"]),
    )


def claimed_from_row(row: Any) -> ClaimedDelivery:
    m = row._mapping
    return ClaimedDelivery(
        delivery_id=m["delivery_id"],
        template_id=m["template_id"],
        idempotency_key=m["idempotency_key"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        cycle_started_at=m["cycle_started_at"],
        expires_at=m["expires_at"],
        claim_token=m["claim_token"],
        claimed_at=m["claimed_at"],
        locked_until=m["locked_until"],
        previous_status=Status(m["previous_status"]),
        payload=payload_from_row(row),
        recipients=tuple(
            Recipient(address, Kind(kind))
            for address, kind in zip(m["addresses"] or (), m["kinds"] or (), strict=False)
        ),
    )


def status_counts(rows: Iterable[Any]) -> dict[Status, int]:
    counts = {status: 0 for status in Status}
    for status, count in rows:
        counts[Status(status)] = int(count)
    return counts


# --- the store ----------------------------------------------------------------------------


class Store:
    """Every data operation of the outbox, run on a Connection the caller owns."""

    def __init__(self, schema: str | Tables = "mailoutbox") -> None:
        self.tables = schema if isinstance(schema, Tables) else tables_for(schema)

    # enqueue

    def insert_enqueue(
        self, conn: sa.Connection, mails: Sequence[PreparedMail]
    ) -> list[tuple[uuid.UUID, bool]]:
        """Insert `mails`; return (delivery_id, created) per mail, in input order.

        One statement for the whole batch, plus one lookup only when some mails
        were duplicates of existing (or earlier) deliveries.
        """
        if not mails:
            return []
        batch = enqueue_params(mails)
        created = set(conn.execute(st.insert_enqueue(self.tables), batch.params).scalars())
        missing = [m for m, i in zip(mails, batch.delivery_ids, strict=False) if i not in created]
        existing: dict[tuple[str, str], uuid.UUID] = {}
        if missing:
            rows = conn.execute(
                st.select_existing_ids(self.tables),
                _array_params(
                    {
                        "template_id": [m.template_id for m in missing],
                        "idempotency_key": [m.idempotency_key for m in missing],
                    }
                ),
            )
            existing = {(r.template_id, r.idempotency_key): r.delivery_id for r in rows}
        out = []
        for mail, proposed in zip(mails, batch.delivery_ids, strict=False):
            if proposed in created:
                out.append((proposed, True))
            else:
                out.append((existing[(mail.template_id, mail.idempotency_key)], False))
        return out

    # worker operations

    def claim_due(
        self,
        conn: sa.Connection,
        *,
        limit: int,
        worker: str,
        lease_seconds: float,
        exclude: Sequence[uuid.UUID] = (),
        claim_token: uuid.UUID | None = None,
    ) -> list[ClaimedDelivery]:
        """Lease up to `limit` due deliveries (see statements.claim_due); commit right after."""
        rows = conn.execute(
            st.claim_due(self.tables),
            {
                "limit": limit,
                "worker": worker,
                "lease_seconds": float(lease_seconds),
                "exclude": list(exclude),
                "token": claim_token or uuid.uuid4(),
            },
        )
        return [claimed_from_row(row) for row in rows]

    def complete(self, conn: sa.Connection, completions: Sequence[Completion]) -> set[uuid.UUID]:
        """Apply completions in one statement; return the ids whose claim still held."""
        if not completions:
            return set()
        result = conn.execute(st.complete_claimed(self.tables), completion_params(completions))
        return set(result.scalars())

    def mark_sent_if_claimed(self, conn: sa.Connection, completion: Completion) -> bool:
        return self._complete_one(conn, completion, Status.SENT)

    def schedule_retry_if_claimed(self, conn: sa.Connection, completion: Completion) -> bool:
        return self._complete_one(conn, completion, Status.RETRYING)

    def mark_dead_lettered_if_claimed(self, conn: sa.Connection, completion: Completion) -> bool:
        return self._complete_one(conn, completion, Status.DEAD_LETTERED)

    def _complete_one(self, conn: sa.Connection, completion: Completion, status: Status) -> bool:
        if completion.status != status:
            raise ValueError(f"completion has status {completion.status}, expected {status}")
        return completion.delivery_id in self.complete(conn, [completion])

    def release(
        self, conn: sa.Connection, delivery_ids: Sequence[uuid.UUID], claim_token: uuid.UUID
    ) -> int:
        """Hand unsent leased deliveries back as due now; returns how many were released."""
        if not delivery_ids:
            return 0
        result = conn.execute(
            st.release_claimed(self.tables),
            {"delivery_ids": list(delivery_ids), "token": claim_token},
        )
        return result.rowcount

    # reads

    def get_delivery(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery | None:
        row = conn.execute(st.select_delivery(self.tables), {"delivery_id": delivery_id}).first()
        return None if row is None else delivery_from_row(row)

    def list_deliveries(
        self,
        conn: sa.Connection,
        *,
        offset: int,
        limit: int,
        status: Status | None = None,
        template_id: str | None = None,
    ) -> tuple[list[Delivery], int]:
        filters: dict[str, Any] = {}
        if status is not None:
            filters["status"] = Status(status).value
        if template_id is not None:
            filters["template_id"] = template_id
        total = conn.execute(
            st.count_deliveries(self.tables, status=status, template_id=template_id), filters
        ).scalar_one()
        rows = conn.execute(
            st.list_deliveries(self.tables, status=status, template_id=template_id),
            {**filters, "offset": offset, "limit": limit},
        )
        return [delivery_from_row(row) for row in rows], int(total)

    def list_recipients(self, conn: sa.Connection, delivery_id: uuid.UUID) -> list[Recipient]:
        rows = conn.execute(st.select_recipients(self.tables), {"delivery_id": delivery_id})
        return [Recipient(row.address, Kind(row.kind)) for row in rows]

    def get_payload(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Payload | None:
        row = conn.execute(st.select_payload(self.tables), {"delivery_id": delivery_id}).first()
        return None if row is None else payload_from_row(row)

    def list_attempts(self, conn: sa.Connection, delivery_id: uuid.UUID) -> list[Attempt]:
        rows = conn.execute(st.select_attempts(self.tables), {"delivery_id": delivery_id})
        return [attempt_from_row(row) for row in rows]

    def list_dead_letters(
        self, conn: sa.Connection, *, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        total = conn.execute(st.count_dead_letters(self.tables)).scalar_one()
        rows = conn.execute(st.list_dead_letters(self.tables), {"offset": offset, "limit": limit})
        return [dead_letter_from_row(row) for row in rows], int(total)

    def count_by_status(self, conn: sa.Connection) -> dict[Status, int]:
        return status_counts(conn.execute(st.count_by_status(self.tables)))

    def queue_health(self, conn: sa.Connection) -> tuple[float, int]:
        """(age in seconds of the oldest due delivery, leases in flight)."""
        row = conn.execute(st.select_queue_health(self.tables)).one()
        return float(row.oldest_due_seconds), int(row.leased)

    # operator actions

    def resend(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery | None:
        """Re-arm unless sent or sending; None when nothing changed (caller reads why)."""
        row = conn.execute(
            st.resend_unless_sent_or_sending(self.tables), {"target_id": delivery_id}
        ).first()
        if row is None:
            return None
        conn.execute(st.notify_due(self.tables))
        return delivery_from_row(row)

    def cancel(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery | None:
        row = conn.execute(st.cancel_if_waiting(self.tables), {"target_id": delivery_id}).first()
        return None if row is None else delivery_from_row(row)

    def purge_batch(self, conn: sa.Connection, *, older_than_seconds: float, batch: int) -> int:
        return int(
            conn.execute(
                st.purge_terminal_batch(self.tables),
                {"age_seconds": float(older_than_seconds), "batch": batch},
            ).scalar_one()
        )
