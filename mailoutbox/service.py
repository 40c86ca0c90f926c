"""One configured worker process: engine, SMTP transport, metrics, the run loop.

`mailoutbox worker` builds a WorkerSettings from its flags and runs
`serve_worker` in its own process, or (with `--processes N`) hands it to the
supervisor, which runs it in N children. The settings are plain values so they
can travel to a spawned interpreter; the password travels with them through
the pipe multiprocessing opens, never through argv or the environment.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from .errors import first_line
from .logs import format_duration
from .migrations import require_current
from .outbox import Outbox, translate_missing_schema
from .retry import RetryPolicy
from .worker import Worker, WorkerObserver

log = logging.getLogger(__name__)

# One connection claims and records, one claims the next batch beside that record,
# one listens (detached from the pool), one serves metrics.
POOL_SIZE = 3
MAX_OVERFLOW = 2


class MetricsUnavailable(Exception):
    """The metrics endpoint could not be served (its port is taken, ...)."""


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int | None
    security: str
    username: str | None
    password: str | None
    timeout: float

    def __repr__(self) -> str:  # never show the password in a log or a traceback
        return f"SmtpSettings(host={self.host!r}, port={self.port!r}, security={self.security!r})"


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs, as plain picklable values."""

    url: sa.URL
    schema: str
    smtp: SmtpSettings
    retry: RetryPolicy
    batch_size: int
    concurrency: int
    lease: timedelta
    poll_interval: timedelta
    listen: bool
    name: str | None
    message_id_domain: str | None
    metrics_port: int | None
    metrics_host: str
    connect_args: tuple[tuple[str, Any], ...] = ()

    def for_process(self, index: int) -> WorkerSettings:
        """The settings of child `index` (1-based) of a supervised group.

        A given name gets the suffix `-index` (names show in leases and
        attempts, so each process keeps its own); a metrics port becomes
        `port + index - 1` (port 0 stays 0: each child picks a free one).
        """
        return replace(
            self,
            name=f"{self.name}-{index}" if self.name else None,
            metrics_port=(
                self.metrics_port + index - 1 if self.metrics_port else self.metrics_port
            ),
        )

    def engine(self) -> sa.Engine:
        return sa.create_engine(
            self.url,
            connect_args=dict(self.connect_args),
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
        )

    def worker(self, outbox: Outbox, observer: WorkerObserver | None = None) -> Worker:
        """The Worker these settings describe; ValueError for settings it refuses."""
        from .transports.smtp import SmtpTransport

        smtp = self.smtp
        transport = SmtpTransport(
            smtp.host,
            smtp.port,
            security=smtp.security,  # type: ignore[arg-type]
            username=smtp.username,
            password=smtp.password,
            timeout=smtp.timeout,
        )
        return Worker(
            outbox,
            transport,
            retry=self.retry,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            lease=self.lease,
            poll_interval=self.poll_interval,
            listen=self.listen,
            name=self.name,
            message_id_domain=self.message_id_domain,
            observer=observer,
        )


def require_ready(outbox: Outbox) -> None:
    """Fail fast, before anything is claimed: the database unreachable, the tables
    missing, or a migration this release needs not yet run (SchemaNotMigrated)."""
    outbox.queue_health()
    with translate_missing_schema(outbox.schema), outbox.engine.connect() as connection:
        require_current(connection, outbox.schema)


def serve_worker(settings: WorkerSettings, engine: sa.Engine | None = None) -> None:
    """Run one worker until SIGTERM or SIGINT, then finish the sends in flight.

    `engine`: one the caller already made (and disposes of); by default the
    settings' own. Raises what goes wrong on the way up (an unreachable or
    unmigrated database, a taken metrics port) before anything is claimed.
    """
    with contextlib.ExitStack() as stack:
        if engine is None:
            engine = settings.engine()
            stack.callback(engine.dispose)
        outbox = Outbox(engine, schema=settings.schema)
        require_ready(outbox)

        observer: WorkerObserver | None = None
        port_note = ""
        if settings.metrics_port is not None:
            from . import metrics

            prometheus = metrics.PrometheusObserver()
            try:
                server = metrics.start_metrics_server(
                    settings.metrics_port, outbox, prometheus, addr=settings.metrics_host
                )
            except (OSError, OverflowError) as exc:
                # OverflowError: socket's own refusal of a port past 65535.
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise MetricsUnavailable(
                    f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                    f"{reason}"
                ) from None
            stack.callback(server.close)
            observer, port_note = prometheus, f", metrics on port {server.port}"

        runner = settings.worker(outbox, observer)
        smtp = settings.smtp
        log.info(
            "worker %s starting: SMTP %s:%d (%s%s), batch %d, concurrency %d, lease %s%s",
            runner.name,
            smtp.host,
            runner.transport.port,
            smtp.security,
            ", with login" if smtp.username else "",
            settings.batch_size,
            settings.concurrency,
            format_duration(settings.lease.total_seconds()),
            port_note,
            extra={"worker": runner.name, "schema": settings.schema},
        )
        runner.run()
        log.info("worker %s stopped", runner.name, extra={"worker": runner.name})


def serve_supervised(settings: WorkerSettings, log_level: str, log_format: str, index: int) -> None:
    """A supervised child's whole life: logging, then `serve_worker` (see supervisor.py).

    A failure is one log line and exit status 1; the supervisor starts the
    child again after its back-off.
    """
    from .logs import configure_logging

    configure_logging(log_level, log_format)
    try:
        serve_worker(settings.for_process(index))
    except Exception as exc:  # noqa: BLE001  (one line in the log, then a restart)
        log.error("worker process %d failed: %s: %s", index, type(exc).__name__, first_line(exc))
        sys.exit(1)
