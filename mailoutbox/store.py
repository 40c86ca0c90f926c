"""Runs the outbox's operations (operations.py) on a caller's Connection, synchronously.

The store never begins, commits or rolls back: transaction scope belongs to
its caller (the Outbox facade, the worker, or the host application).
aio.AsyncStore is its twin on an AsyncConnection, running the same plans.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from . import operations as ops
from .direct import DirectConnection
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
from .schema import DEFAULT_SCHEMA, Status, Tables, tables_for

T = TypeVar("T")


def execute(conn: sa.Connection, query: ops.Query) -> sa.CursorResult[Any]:
    if query.arrays:
        ops.use_binary_results(conn.engine)
        sql, params = ops.driver_call(query, conn.dialect)
        return conn.exec_driver_sql(sql, params, ops.BINARY_RESULTS)
    return conn.execute(query.statement, query.params or {})


def run(conn: sa.Connection | DirectConnection, plan: ops.Plan[T]) -> T:
    """Drive a plan to its answer, executing each Query it yields on `conn`."""
    if isinstance(conn, DirectConnection):
        return conn.run(plan)
    try:
        query = next(plan)
        while True:
            query = plan.send(ops.fetch(execute(conn, query), query.fetch))
    except StopIteration as done:
        answer: T = done.value
        return answer


class Store:
    """Every data operation of the outbox, run on a Connection the caller owns."""

    def __init__(self, schema: str | Tables = DEFAULT_SCHEMA) -> None:
        self.tables = schema if isinstance(schema, Tables) else tables_for(schema)

    def insert_enqueue(
        self, conn: sa.Connection | DirectConnection, mails: Sequence[PreparedMail]
    ) -> list[tuple[uuid.UUID, bool]]:
        return run(conn, ops.insert_enqueue(self.tables, mails))

    def claim_due(
        self,
        conn: sa.Connection | DirectConnection,
        *,
        limit: int,
        worker: str,
        lease_seconds: float,
        exclude: Sequence[uuid.UUID] = (),
        claim_token: uuid.UUID | None = None,
    ) -> list[ClaimedDelivery]:
        """Lease due deliveries (operations.claim_due); the caller commits right after."""
        return run(
            conn,
            ops.claim_due(
                self.tables,
                limit=limit,
                worker=worker,
                lease_seconds=lease_seconds,
                exclude=exclude,
                claim_token=claim_token,
            ),
        )

    def complete(
        self, conn: sa.Connection | DirectConnection, completions: Sequence[Completion]
    ) -> set[uuid.UUID]:
        return run(conn, ops.complete(self.tables, completions))

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
        self,
        conn: sa.Connection | DirectConnection,
        delivery_ids: Sequence[uuid.UUID],
        claim_token: uuid.UUID,
    ) -> int:
        return run(conn, ops.release(self.tables, delivery_ids, claim_token))

    def get_delivery(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery | None:
        return run(conn, ops.get_delivery(self.tables, delivery_id))

    def list_deliveries(
        self,
        conn: sa.Connection,
        *,
        offset: int,
        limit: int,
        status: Status | None = None,
        template_id: str | None = None,
    ) -> tuple[list[Delivery], int]:
        return run(
            conn,
            ops.list_deliveries(
                self.tables, offset=offset, limit=limit, status=status, template_id=template_id
            ),
        )

    def list_recipients(self, conn: sa.Connection, delivery_id: uuid.UUID) -> list[Recipient]:
        return run(conn, ops.list_recipients(self.tables, delivery_id))

    def get_payload(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Payload | None:
        return run(conn, ops.get_payload(self.tables, delivery_id))

    def list_attempts(self, conn: sa.Connection, delivery_id: uuid.UUID) -> list[Attempt]:
        return run(conn, ops.list_attempts(self.tables, delivery_id))

    def list_dead_letters(
        self, conn: sa.Connection, *, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        return run(conn, ops.list_dead_letters(self.tables, offset=offset, limit=limit))

    def count_by_status(self, conn: sa.Connection) -> dict[Status, int]:
        return run(conn, ops.count_by_status(self.tables))

    def queue_health(self, conn: sa.Connection) -> tuple[float, int]:
        return run(conn, ops.queue_health(self.tables))

    def resend(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery:
        return run(conn, ops.resend(self.tables, delivery_id))

    def cancel(self, conn: sa.Connection, delivery_id: uuid.UUID) -> Delivery:
        return run(conn, ops.cancel(self.tables, delivery_id))

    def purge_batch(self, conn: sa.Connection, *, older_than_seconds: float, batch: int) -> int:
        return run(
            conn,
            ops.purge_batch(self.tables, older_than_seconds=older_than_seconds, batch=batch),
        )
