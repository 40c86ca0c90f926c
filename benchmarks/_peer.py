"""The peer: pgqueuer draining jobs that render the benchmark's mail (peer_pgqueuer_drain).

pgqueuer is a benchmark-only dependency (benchmarks/requirements.txt). Its tables go
into the benchmark's schema (PGQUEUER_SCHEMA) and are dropped with it. Each job
carries what the outbox stores for a mail (sender, recipient, subject, the 1 KB
body) and its handler renders the message with mailoutbox's renderer and hands
it to the same recording null transport the outbox's worker uses. Same batch
size (100), same database, same run.

The peer runs the way pgqueuer's own CLI runs it: on asyncpg (its primary driver)
and uvloop when they are installed. Its psycopg driver waits for notifications
while holding the connection's lock (up to a second per wait when none come),
which throttles a drain to a few hundred jobs/s and would not be a fair peer;
it is used only when asyncpg is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import _common


def job_payload(i: int) -> bytes:
    return json.dumps(
        {
            "id": uuid.uuid4().hex,
            "sender": _common.SENDER,
            "to": _common.recipient(i),
            "subject": _common.SUBJECT.format(i=i),
            "text": _common.BODY_1KB,
        }
    ).encode()


async def pgqueuer_drain(
    config: dict[str, Any],
    go: threading.Event,
    emit: Callable[..., None],
    finished: Callable[[dict[str, Any]], None],
) -> None:
    os.environ["PGQUEUER_SCHEMA"] = config["schema"]
    from pgqueuer import Queries, QueueManager
    from pgqueuer.domain.settings import db_settings
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.models import Job

    from mailoutbox import Kind, Payload, Recipient
    from mailoutbox.render import render

    db_settings.cache_clear()
    settings = db_settings()
    count: int = config["count"]
    batch_size: int = config.get("batch_size", 100)

    conn, driver, driver_name = await _connect(config["libpq_url"])
    try:
        queries = Queries(driver)
        # Every round of the comparison starts from freshly installed tables, as the first.
        if await queries.schema_is_installed():
            await queries.uninstall()
        await queries.install(create_schema=False)
        step = 1000
        for lo in range(0, count, step):
            n = min(step, count - lo)
            await queries.enqueue(
                ["mail"] * n, [job_payload(i) for i in range(lo, lo + n)], [0] * n
            )
        await driver.execute(f"ANALYZE {settings.qualified.queue_table}")

        transport = _common.RecordingNullTransport()
        handled: list[int] = []
        qm = QueueManager(queries)

        # Untyped only where pgqueuer is missing, as in CI's type check; unused elsewhere.
        @qm.entrypoint("mail")  # type: ignore[untyped-decorator, unused-ignore]
        async def send_mail(job: Job) -> None:
            assert job.payload is not None
            data = json.loads(job.payload)
            payload = Payload(
                "text/plain", data["subject"], data["text"].encode(), None, data["sender"], ()
            )
            envelope = render(
                uuid.UUID(data["id"]),
                payload,
                (Recipient(data["to"], Kind.TO),),
                date=datetime.now(timezone.utc),
            )
            transport.send(envelope)
            handled.append(job.id)

        emit("ready")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start = time.time()
        await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
        end = time.time()

        left = await driver.fetch(f"SELECT count(*) AS n FROM {settings.qualified.queue_table}")
        logged = await driver.fetch(
            f"SELECT count(*) AS n FROM {settings.qualified.queue_table_log} "
            "WHERE status = 'successful'"
        )
        finished(
            {
                "start": start,
                "end": end,
                "ids": handled,
                "left_in_queue": left[0]["n"],
                "logged_successful": logged[0]["n"],
                "driver": driver_name,
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "sample_problem": _common.check_sample(transport.sample),
            }
        )
    finally:
        await conn.close()


async def _connect(url: str) -> tuple[Any, Any, str]:
    """(connection, pgqueuer driver, its name): asyncpg if installed, else psycopg."""
    try:
        import asyncpg
    except ImportError:
        import psycopg
        from pgqueuer import PsycopgDriver

        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        return conn, PsycopgDriver(conn), "psycopg"
    from pgqueuer import AsyncpgDriver

    conn = await asyncpg.connect(url)
    return conn, AsyncpgDriver(conn), "asyncpg"


def event_loop_factory() -> Any:
    """uvloop's loop when installed (as `pgq run` uses), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
