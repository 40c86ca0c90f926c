"""mailoutbox benchmark: `python benchmarks/run.py [--quick] [--json] [--database-url URL]`.

Measures the figures of issue 6 (enqueue, drain, latency, SMTP, claim, and the
pgqueuer peer) in a fresh schema `bench_<random>` that is migrated with
mailoutbox.migrate() and dropped at the end. Without --database-url an embedded
PostgreSQL is started (and stopped) for the run.

Every figure is verified before anything is printed: each delivery was sent
exactly once (the database counts it `sent` once, and the transport, the SMTP
sink or the peer's handler saw its id once), and a rendered sample parses back
to the mail that was enqueued. If verification fails the problems go to stderr,
the figures are printed to stderr marked UNVERIFIED, and the exit status is 1.

Output: a table for people, or with --json one object per line:
{"name": ..., "value": ..., "unit": ...}. The last line is
{"name": "verified", "value": 1, "unit": "bool"}. Progress goes to stderr.
See benchmarks/README.md for the targets and the figures of the last run.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import itertools
import json
import os
import queue
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

import mailoutbox  # noqa: E402
from mailoutbox import Outbox, Status  # noqa: E402

# --- scale ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    enqueue_single: int
    enqueue_many: int
    drain: int
    latency_seconds: float
    smtp: int
    claim_rounds: int
    history: int
    # drain_null and the peer are each run this many times, alternated (compare_with_peer).
    comparison_rounds: int


FULL = Scale(
    enqueue_single=20_000,
    enqueue_many=100_000,
    drain=20_000,
    latency_seconds=15.0,
    smtp=5_000,
    claim_rounds=100,
    history=1_000_000,
    comparison_rounds=3,
)
QUICK = Scale(
    enqueue_single=1_000,
    enqueue_many=5_000,
    drain=2_000,
    latency_seconds=2.0,
    smtp=300,
    claim_rounds=20,
    history=100_000,
    comparison_rounds=1,
)

LATENCY_RATE = 200  # mails/s, enqueued one per transaction
LATENCY_THREADS = 4  # enqueuers sharing the schedule, so one slow commit does not lag the rate
THREADS = 8
BATCH = 100
CHILD_TIMEOUT = 600.0

# name -> (comparison, threshold, how the issue words it); for the human table only.
TARGETS: dict[str, tuple[str, float, str]] = {
    "enqueue_many": (">=", 15_000, ">= 15,000 (aim 20,000)"),
    "enqueue_single": (">=", 3_000, ">= 3,000"),
    "drain_null": (">=", 5_000, ">= 5,000"),
    "drain_vs_pgqueuer": (">=", 1.5, ">= 1.5"),
    "latency_p50_ms": ("<=", 20, "<= 20"),
    "latency_p99_ms": ("<=", 100, "<= 100"),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class VerificationError(Exception):
    pass


# --- child processes --------------------------------------------------------------------

_children: list[Child] = []
_spawned = itertools.count()


class Child:
    """A benchmark child process (see _child.py), spoken to in JSON lines."""

    def __init__(self, role: str, config: dict[str, Any], workdir: Path) -> None:
        self.role = role
        self.out = workdir / f"{role}-{next(_spawned)}.json"
        config = {**config, "out": str(self.out)}
        # The configuration (database URL included) goes through the environment, not
        # argv, so that no password shows in the process list.
        env = {**os.environ, "MAILOUTBOX_BENCH_CHILD": json.dumps(config)}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_child.py"), role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        _children.append(self)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"read-{role}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                sys.stderr.write(f"[{self.role}] {line}")
        self.events.put({"event": "exit"})

    def expect(self, event: str, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        try:
            message = self.events.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"child {self.role}: no {event!r} within {timeout:.0f}s") from None
        if message.get("event") != event:
            raise RuntimeError(f"child {self.role}: expected {event!r}, got {message}")
        return message

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data

    def close(self, timeout: float = 10.0) -> None:
        """End the process: closing its stdin makes it exit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self in _children:
            _children.remove(self)


def close_children() -> None:
    for child in list(_children):
        with contextlib.suppress(Exception):
            child.close(timeout=5.0)


atexit.register(close_children)


@contextlib.contextmanager
def children(*spawned: Child) -> Iterator[tuple[Child, ...]]:
    try:
        yield spawned
    finally:
        for child in spawned:
            child.close()


@dataclass
class CpuSpent:
    """CPU seconds spent over `seconds` of wall time: the whole machine's, and PostgreSQL's."""

    seconds: float
    machine: float
    database: float | None  # None: the server's processes are not on this machine


class MachineCpu:
    """Busy CPU seconds of the whole machine, and of PostgreSQL's processes, between
    start() and stop().

    Every process counts: the worker processes, PostgreSQL's backends and its
    WAL writer, anything else running. So a drain's figure is the work one
    delivery costs end to end, comparable with the peer's on the same machine.
    PostgreSQL's share sums its processes' CPU time, with that of backends that
    exited meanwhile (counted in the postmaster's children times). Without psutil
    (not installed) it measures nothing and stop() answers None.
    """

    def __init__(self) -> None:
        self._clock_and_machine: tuple[float, float] | None = None
        self._database: float | None = None

    @staticmethod
    def _clock_and_machine_now() -> tuple[float, float] | None:
        try:
            import psutil
        except ImportError:
            return None
        times = psutil.cpu_times()
        # Linux also counts irq and softirq; idle, iowait and steal are not work.
        busy = sum(
            getattr(times, part, 0.0) for part in ("user", "nice", "system", "irq", "softirq")
        )
        return time.perf_counter(), busy

    @staticmethod
    def _database_now() -> float | None:
        try:
            import psutil
        except ImportError:
            return None
        total, found = 0.0, False
        for process in psutil.process_iter(["name"]):
            if process.info["name"] not in ("postgres", "postmaster"):
                continue
            with contextlib.suppress(psutil.Error):
                spent = process.cpu_times()
                total += spent.user + spent.system + spent.children_user + spent.children_system
                found = True
        return total if found else None

    def start(self) -> None:
        # The scan of the process table goes outside the window (before it opens, after
        # it closes): the driver's own work would otherwise count as the drain's.
        self._database = self._database_now()
        self._clock_and_machine = self._clock_and_machine_now()

    def stop(self) -> CpuSpent | None:
        end = self._clock_and_machine_now()
        end_database = self._database_now()
        if self._clock_and_machine is None or end is None:
            return None
        database = None
        if end_database is not None and self._database is not None:
            database = end_database - self._database
        (start_clock, start_machine), (end_clock, end_machine) = self._clock_and_machine, end
        return CpuSpent(end_clock - start_clock, end_machine - start_machine, database)


@dataclass
class Cost:
    """What a measured window cost: the CPU (when it was asked for) and the WAL written."""

    cpu: CpuSpent | None = None
    wal_bytes: int | None = None


@dataclass
class Drained:
    """One verified drain: its rate (deliveries or jobs per second) and what it cost."""

    rate: float
    cost: Cost


# --- the run ----------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float
    unit: str


@dataclass
class Bench:
    engine: sa.Engine
    url: sa.URL
    schema: str
    scale: Scale
    workdir: Path
    only: set[str] | None
    profile_dir: Path | None
    outbox: Outbox = field(init=False)
    figures: list[Figure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verified_deliveries: int = 0

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.engine, schema=self.schema, default_sender=_common.SENDER)

    # helpers

    def wanted(self, *names: str) -> bool:
        return self.only is None or any(n in self.only for n in names)

    def add(self, name: str, value: float, unit: str) -> None:
        self.figures.append(Figure(name, value, unit))
        log(f"  {name} = {format_value(value)} {unit}")

    @contextlib.contextmanager
    def costing(self, *, cpu: bool) -> Iterator[Cost]:
        """Measure the block's WAL and, with `cpu`, its CPU; filled in once it ends.

        The WAL position is read outside the CPU window, so that query is not counted.
        """
        cost = Cost()
        wal_start = self.wal_position()
        machine = MachineCpu() if cpu else None
        if machine is not None:
            machine.start()
        yield cost
        if machine is not None:
            cost.cpu = machine.stop()
        wal_end = self.wal_position()
        if wal_start is not None and wal_end is not None:
            cost.wal_bytes = wal_end - wal_start

    def add_cost(self, name: str, cost: Cost, count: int) -> None:
        """Per item: CPU (the machine's, PostgreSQL's, the cores kept busy) and WAL written.

        The WAL is what replicas, archives and backups receive for each mail or delivery.
        """
        spent = cost.cpu
        if spent is not None and spent.seconds > 0:
            self.add(f"{name}_cpu_us", round(spent.machine / count * 1e6), "us CPU each")
            if spent.database is not None and self.database_is_local():
                self.add(f"{name}_db_cpu_us", round(spent.database / count * 1e6), "us CPU each")
            self.add(f"{name}_cores_busy", round(spent.machine / spent.seconds, 2), "cores")
        if cost.wal_bytes is not None:
            self.add(f"{name}_wal_bytes", round(cost.wal_bytes / count), "bytes WAL each")

    def wal_position(self) -> int | None:
        """Where PostgreSQL's write-ahead log ends now, in bytes; None where it cannot say."""
        try:
            rows = self.sql("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
        except sa.exc.DBAPIError:  # a standby, or a role not allowed to ask
            return None
        return int(rows[0][0])

    def database_is_local(self) -> bool:
        # A server elsewhere leaves only the local processes to count, maybe another server's.
        return self.url.host in (None, "", "localhost", "127.0.0.1", "::1")

    def add_ratio(self, name: str, numerator: str, denominator: str) -> None:
        values = {f.name: f.value for f in self.figures}
        if numerator in values and denominator in values:
            self.add(name, round(values[numerator] / values[denominator], 2), "ratio")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)
            log(f"  VERIFICATION FAILED: {what}")

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one statement in its own transaction; its rows (fetched before commit)."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []

    def autocommit(self, *statements: str) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for statement in statements:
                conn.execute(sa.text(statement))

    def tables(self) -> list[str]:
        names = (
            "mail_attempts",
            "mail_dead_letters",
            "mail_recipients",
            "mail_deliveries",
            "mail_payloads",
        )
        return [f'"{self.schema}".{name}' for name in names]

    def reset(self) -> None:
        """Empty the outbox tables (a fresh start for the next figure)."""
        self.sql("TRUNCATE " + ", ".join(self.tables()))

    def analyze(self, vacuum: bool = False) -> None:
        verb = "VACUUM (ANALYZE)" if vacuum else "ANALYZE"
        self.autocommit(*(f"{verb} {t}" for t in self.tables()))

    def load(self, count: int, tag: str, batch: int = 1000) -> set[str]:
        """Enqueue `count` due mails (not timed); return their delivery ids (hex)."""
        ids: set[str] = set()
        for lo in range(0, count, batch):
            mails = [_common.bench_mail(i, tag) for i in range(lo, min(count, lo + batch))]
            ids.update(r.delivery_id.hex for r in self.outbox.enqueue_many(mails))
        return ids

    def status_counts(self) -> dict[Status, int]:
        return self.outbox.count_by_status()

    def verify_all_sent(
        self, label: str, ids: set[str], seen: Sequence[str], *, history: int = 0
    ) -> None:
        """The database counts every delivery sent once; the transport saw each id once.

        `history`: sent deliveries (one 'sent' attempt each) in the table before.
        """
        counts = self.status_counts()
        n = len(ids)
        total = history + n
        self.check(
            counts[Status.SENT] == total, f"{label}: {counts[Status.SENT]} sent, expected {total}"
        )
        others = {s.value: c for s, c in counts.items() if s is not Status.SENT and c}
        self.check(not others, f"{label}: deliveries left in other states: {others}")
        attempts = self.sql(
            f'SELECT count(*), count(DISTINCT delivery_id) FROM "{self.schema}".mail_attempts '
            "WHERE outcome = 'sent'"
        )[0]
        self.check(
            attempts[0] == total and attempts[1] == total,
            f"{label}: {attempts[0]} 'sent' attempts for {attempts[1]} deliveries, "
            f"expected {total}",
        )
        dupes = [d for d, c in Counter(seen).items() if c > 1]
        self.check(not dupes, f"{label}: {len(dupes)} deliveries sent more than once")
        self.check(
            set(seen) == ids,
            f"{label}: the transport saw {len(set(seen))} distinct deliveries, "
            f"{len(ids - set(seen))} enqueued ones missing, {len(set(seen) - ids)} unknown",
        )
        if not self.problems:
            self.verified_deliveries += n

    def child_config(self, **extra: Any) -> dict[str, Any]:
        return {"url": _common.url_text(self.url), "schema": self.schema, **extra}

    # figures

    def enqueue_single(self) -> None:
        n = self.scale.enqueue_single
        log(f"enqueue_single: {n} mails, one enqueue per transaction, {THREADS} threads")
        self.reset()
        mails = [_common.bench_mail(i, "single") for i in range(n)]
        results: list[list[Any]] = [[] for _ in range(THREADS)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(THREADS + 1)

        def run(k: int) -> None:
            barrier.wait()
            try:
                out = results[k]
                for mail in mails[k::THREADS]:
                    out.append(self.outbox.enqueue(mail))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        with self.costing(cpu=False) as cost:
            elapsed = self.timed_threads(run, barrier)
        if errors:
            raise errors[0]
        enqueued = [r for out in results for r in out]
        self.verify_enqueued("enqueue_single", enqueued, n)
        self.add("enqueue_single", round(n / elapsed), "mails/s")
        self.add_cost("enqueue_single", cost, n)

    def enqueue_many(self) -> None:
        n = self.scale.enqueue_many
        log(f"enqueue_many: {n} mails, enqueue_many in batches of {BATCH}, one thread")
        self.reset()
        batches = [
            [_common.bench_mail(i, "many") for i in range(lo, min(n, lo + BATCH))]
            for lo in range(0, n, BATCH)
        ]
        enqueued: list[Any] = []
        with self.costing(cpu=False) as cost:
            start = time.perf_counter()
            for batch in batches:
                enqueued.extend(self.outbox.enqueue_many(batch))
            elapsed = time.perf_counter() - start
        self.verify_enqueued("enqueue_many", enqueued, n)
        self.add("enqueue_many", round(n / elapsed), "mails/s")
        self.add_cost("enqueue_many", cost, n)

    # The two ceilings below measure this machine, not mailoutbox: the targets
    # were set against "the database alone" and "the commit-bound ceiling" of its
    # machine, so every run says what those are on the machine it ran on.

    def enqueue_many_db_ceiling(self) -> None:
        """enqueue_many's own statement, with every parameter built before the clock starts.

        One psycopg connection in autocommit, as the outbox's own transaction runs:
        what is left is the server's time and the round trips, the most any client
        could reach with this schema. Verified like enqueue_many.
        """
        from mailoutbox import operations as ops
        from mailoutbox import statements as st

        n = self.scale.enqueue_many
        log(f"enqueue_many_db_ceiling: the same {n} mails and statement, parameters prebuilt")
        self.reset()
        prepared = [self.outbox.prepare(_common.bench_mail(i, "ceiling")) for i in range(n)]
        statement = st.insert_enqueue(self.outbox.tables)
        calls = [
            ops.driver_call(
                ops.Query(statement, ops.enqueue_params(prepared[lo : lo + BATCH]).params),
                self.engine.dialect,
            )
            for lo in range(0, n, BATCH)
        ]
        with psycopg.connect(_common.libpq_url(self.url), autocommit=True) as conn:
            start = time.perf_counter()
            created = [row[0] for sql, params in calls for row in conn.execute(sql, params)]
            elapsed = time.perf_counter() - start
        self.check(len(set(created)) == n, f"db ceiling: {len(set(created))} created, expected {n}")
        self.verify_rows("enqueue_many_db_ceiling", n)
        self.add("enqueue_many_db_ceiling", round(n / elapsed), "mails/s")

    def enqueue_single_commit_ceiling(self) -> None:
        """Single-row transactions committed by THREADS psycopg threads: the commit ceiling.

        The narrowest table, no index, no trigger: what one Python process with
        THREADS threads can commit one transaction at a time on this machine.
        """
        n = self.scale.enqueue_single
        table = f'"{self.schema}".bench_commit_probe'
        log(f"enqueue_single_commit_ceiling: {n} one-row transactions, {THREADS} threads")
        self.autocommit(f"CREATE TABLE {table} (n integer NOT NULL)")
        elapsed = self.on_psycopg_threads(
            [(f"INSERT INTO {table} VALUES (%s)", (i,)) for i in range(n)]
        )
        count = self.sql(f"SELECT count(DISTINCT n) FROM {table}")[0][0]
        self.check(count == n, f"commit ceiling: {count} rows, expected {n}")
        self.autocommit(f"DROP TABLE {table}")
        self.add("enqueue_single_commit_ceiling", round(n / elapsed), "transactions/s")

    def enqueue_single_db_ceiling(self) -> None:
        """enqueue's own statement from THREADS psycopg threads, parameters prebuilt.

        Run as a deferred-notify enqueue whose NOTIFY is never sent: the upper
        bound of the statement itself, with no wake-up at all. Verified like
        enqueue_single.
        """
        from mailoutbox import operations as ops
        from mailoutbox import statements as st

        n = self.scale.enqueue_single
        log(f"enqueue_single_db_ceiling: the same {n} mails and statement, {THREADS} threads")
        self.reset()
        statement = st.insert_enqueue_one(self.outbox.tables, notify_after_commit=True)
        ids = ops.time_ordered_uuids(n)
        calls = [
            ops.driver_call(
                ops.Query(
                    statement,
                    ops.enqueue_one_params(
                        self.outbox.prepare(_common.bench_mail(i, "single-ceiling")), ids[i]
                    ),
                ),
                self.engine.dialect,
            )
            for i in range(n)
        ]
        elapsed = self.on_psycopg_threads(calls)
        self.verify_rows("enqueue_single_db_ceiling", n)
        self.add("enqueue_single_db_ceiling", round(n / elapsed), "mails/s")

    def on_psycopg_threads(self, calls: Sequence[tuple[str, Any]]) -> float:
        """Run (sql, params) calls round-robin on THREADS autocommit psycopg connections.

        Answers the seconds from the start of the first call to the end of the last.
        """
        errors: list[BaseException] = []
        barrier = threading.Barrier(THREADS + 1)

        def run(k: int) -> None:
            try:
                with psycopg.connect(_common.libpq_url(self.url), autocommit=True) as conn:
                    barrier.wait()
                    for sql, params in calls[k::THREADS]:
                        conn.execute(sql, params)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                barrier.abort()

        elapsed = self.timed_threads(run, barrier)
        if errors:
            raise errors[0]
        return elapsed

    def timed_threads(self, run: Any, barrier: threading.Barrier) -> float:
        """Start THREADS threads of `run(k)`; seconds from the barrier to the last one's end."""
        threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    def verify_enqueued(self, label: str, enqueued: Sequence[Any], n: int) -> None:
        self.check(len(enqueued) == n, f"{label}: {len(enqueued)} results for {n} mails")
        self.check(all(r.created for r in enqueued), f"{label}: some mails were not created")
        ids = {r.delivery_id for r in enqueued}
        self.check(len(ids) == n, f"{label}: {len(ids)} distinct delivery ids for {n} mails")
        self.verify_rows(label, n)

    def verify_rows(self, label: str, n: int) -> None:
        """One pending delivery, payload and recipient row per mail; then a clean slate."""
        rows = self.sql(
            f'SELECT (SELECT count(*) FROM "{self.schema}".mail_deliveries WHERE status = '
            f"'pending'), (SELECT count(*) FROM \"{self.schema}\".mail_payloads), "
            f'(SELECT count(*) FROM "{self.schema}".mail_recipients)'
        )[0]
        self.check(
            tuple(rows) == (n, n, n),
            f"{label}: rows (deliveries, payloads, recipients) = {tuple(rows)}, expected {n} each",
        )

    def drain(self, name: str, processes: int, *, history: int = 0) -> None:
        """One drain (drain_once), reported as figure `name` with what it cost."""
        self.add_drained(name, self.drain_once(name, processes, history=history), "deliveries/s")

    def add_drained(self, name: str, drained: Drained, unit: str, cost_name: str = "") -> None:
        self.add(name, round(drained.rate), unit)
        self.add_cost(cost_name or name, drained.cost, self.scale.drain)

    def drain_once(self, name: str, processes: int, *, history: int = 0) -> Drained:
        """`processes` workers drain `scale.drain` due deliveries, verified; no figure added.

        `history`: that many sent deliveries are in the table already (generate_history),
        and stay; otherwise the drain starts on empty tables.
        """
        n = self.scale.drain
        log(
            f"{name}: {processes} worker process(es) draining {n} due deliveries "
            f"into the null transport{f', {history} sent ones in the table' if history else ''}"
        )
        if not history:
            self.reset()
        spawned = []
        for k in range(processes):
            extra: dict[str, Any] = {}
            if self.profile_dir is not None and k == 0:
                extra["pyinstrument"] = str(self.profile_dir / f"{name}.txt")
            spawned.append(Child("drain", self.child_config(**extra), self.workdir))
        with children(*spawned):
            for child in spawned:
                child.expect("ready")
            ids = self.load(n, name)
            self.analyze()
            with self.costing(cpu=True) as cost:
                for child in spawned:
                    child.send("go")
                done = [child.expect("done") for child in spawned]
            results = [child.result() for child in spawned]
        elapsed = max(d["end"] for d in done) - min(d["start"] for d in done)
        seen = [i for r in results for i in r["ids"]]
        for r in results:
            if r.get("sample_problem"):
                self.check(False, f"{name}: rendered sample: {r['sample_problem']}")
        self.verify_all_sent(name, ids, seen, history=history)
        return Drained(n / elapsed, cost)

    def compare_with_peer(self) -> None:
        """drain_null and peer_pgqueuer_drain, alternated; each side's median round reported.

        This machine's speed drifts by tens of per cent within minutes (README), so one
        drain beside one peer run read drain_vs_pgqueuer anywhere from 1.03 to 1.48 on
        the same code. Each round runs both sides back to back, the one going first
        alternating between rounds; each figure is its side's median round, with that
        round's costs, and drain_vs_pgqueuer_min/_max are the lowest and highest ratio
        of the two sides within one round.
        """
        peer_wanted = self.wanted("peer_pgqueuer_drain", "drain_vs_pgqueuer")
        if peer_wanted and importlib.util.find_spec("pgqueuer") is None:
            log(
                "peer_pgqueuer_drain: pgqueuer is not installed "
                "(pip install -r benchmarks/requirements.txt); peer figures skipped"
            )
            peer_wanted = False
        if not peer_wanted:
            self.drain("drain_null", 1)
            return
        rounds = self.scale.comparison_rounds
        ours: list[Drained] = []
        peers: list[Drained] = []
        for r in range(rounds):
            log(f"drain_null beside peer_pgqueuer_drain: round {r + 1} of {rounds}")
            ours_first = r % 2 == 0
            if ours_first:
                ours.append(self.drain_once("drain_null", 1))
            peers.append(self.peer_once())
            if not ours_first:
                ours.append(self.drain_once("drain_null", 1))
            log(
                f"  round {r + 1}: drain_null {ours[-1].rate:,.0f}/s, "
                f"pgqueuer {peers[-1].rate:,.0f}/s, ratio {ours[-1].rate / peers[-1].rate:.2f}"
            )
        ours_median, peers_median = median_round(ours), median_round(peers)
        self.add_drained("drain_null", ours_median, "deliveries/s")
        self.add_drained("peer_pgqueuer_drain", peers_median, "jobs/s", "peer_pgqueuer")
        self.add("drain_vs_pgqueuer", round(ours_median.rate / peers_median.rate, 2), "ratio")
        within = [o.rate / p.rate for o, p in zip(ours, peers, strict=True)]
        self.add("drain_vs_pgqueuer_min", round(min(within), 2), "ratio")
        self.add("drain_vs_pgqueuer_max", round(max(within), 2), "ratio")

    def peer_once(self) -> Drained:
        """pgqueuer drains `scale.drain` jobs rendering the benchmark's mail, verified."""
        n = self.scale.drain
        log(f"peer_pgqueuer_drain: pgqueuer draining {n} jobs that render the same mail")
        self.reset()
        config = self.child_config(libpq_url=_common.libpq_url(self.url), count=n, batch_size=BATCH)
        with children(Child("pgqueuer", config, self.workdir)) as (child,):
            child.expect("ready")
            with self.costing(cpu=True) as cost:
                child.send("go")
                done = child.expect("done")
            result = child.result()
        label = "peer_pgqueuer_drain"
        log(f"  pgqueuer ran on {result['driver']} with the {result['loop']} event loop")
        handled = result["ids"]
        self.check(len(handled) == n, f"{label}: {len(handled)} jobs handled, expected {n}")
        self.check(len(set(handled)) == len(handled), f"{label}: a job was handled twice")
        self.check(
            result["left_in_queue"] == 0,
            f"{label}: {result['left_in_queue']} jobs left in the queue",
        )
        if result.get("sample_problem"):
            self.check(False, f"{label}: rendered sample: {result['sample_problem']}")
        return Drained(n / (done["end"] - done["start"]), cost)

    def smtp(self) -> None:
        n = self.scale.smtp
        log(
            f"smtp_loopback: {n} deliveries through SmtpTransport (security='none') into "
            "an aiosmtpd sink, concurrency 8"
        )
        self.reset()
        with children(Child("sink", {}, self.workdir)) as (sink,):
            port = sink.expect("ready")["port"]
            config = self.child_config(smtp_port=port)
            with children(Child("drain", config, self.workdir)) as (worker,):
                worker.expect("ready")
                ids = self.load(n, "smtp")
                self.analyze()
                worker.send("go")
                done = worker.expect("done")
            sink.send("stop")
            sink.expect("done")
            received = sink.result()
        for problem in received["problems"]:
            self.check(False, f"smtp_loopback: sink: {problem}")
        self.verify_all_sent("smtp_loopback", ids, received["ids"])
        self.add("smtp_loopback", round(n / (done["end"] - done["start"])), "deliveries/s")

    def latency(self) -> None:
        seconds = self.scale.latency_seconds
        total = int(seconds * LATENCY_RATE)
        warmup = 10
        log(
            f"latency: worker.run() with LISTEN/NOTIFY; {total} mails at {LATENCY_RATE}/s, "
            f"one enqueue per transaction ({LATENCY_THREADS} enqueuer threads)"
        )
        self.reset()
        commits: dict[str, float] = {}
        ids: set[str] = set()
        with children(Child("run", self.child_config(), self.workdir)) as (child,):
            child.expect("ready")
            # Warm-up mails prove the worker is up and listening; they are not measured.
            for i in range(warmup):
                ids.add(self.outbox.enqueue(_common.bench_mail(i, "warmup")).delivery_id.hex)
                time.sleep(0.05)
            self.wait_sent(len(ids), 30.0)
            start = time.perf_counter()
            lock = threading.Lock()
            errors: list[BaseException] = []

            def enqueue_every(k: int) -> None:
                # Open loop: mail i is due at start + i/rate, whatever the others do, so a
                # slow enqueue delays only its own thread's next slot.
                try:
                    for i in range(k, total, LATENCY_THREADS):
                        pause = start + i / LATENCY_RATE - time.perf_counter()
                        if pause > 0:
                            time.sleep(pause)
                        r = self.outbox.enqueue(_common.bench_mail(i, "latency"))
                        committed = time.time()
                        with lock:
                            commits[r.delivery_id.hex] = committed
                            ids.add(r.delivery_id.hex)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

            threads = [
                threading.Thread(target=enqueue_every, args=(k,)) for k in range(LATENCY_THREADS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            achieved = total / (time.perf_counter() - start)
            if errors:
                raise errors[0]
            self.wait_sent(len(ids), 60.0)
            child.send("stop")
            child.expect("done")
            result = child.result()
        sends = result["sends"]
        if result.get("sample_problem"):
            self.check(False, f"latency: rendered sample: {result['sample_problem']}")
        self.verify_all_sent("latency", ids, [d for d, _ in sends])
        sent_at = dict(sends)
        latencies = sorted((sent_at[d] - c) * 1000 for d, c in commits.items() if d in sent_at)
        self.check(
            achieved >= LATENCY_RATE * 0.95,
            f"latency: the enqueuer only reached {achieved:.0f} mails/s",
        )
        if latencies:
            self.add("latency_p50_ms", round(percentile(latencies, 50), 2), "ms")
            self.add("latency_p99_ms", round(percentile(latencies, 99), 2), "ms")

    def wait_sent(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status_counts()[Status.SENT] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {count} deliveries to be sent")
            time.sleep(0.02)

    def claim(self) -> None:
        rounds = self.scale.claim_rounds
        self.reset()
        log(f"claim_ms_empty: {rounds} claims of {BATCH} with an empty history")
        self.add("claim_ms_empty", round(self.measure_claims(rounds, "empty"), 3), "ms")
        self.reset()
        rows = self.scale.history
        log(f"claim_ms_1m: generating {rows} sent deliveries of history")
        started = time.perf_counter()
        self.generate_history(rows)
        log(f"  history generated, vacuumed and analyzed in {time.perf_counter() - started:.1f}s")
        if self.wanted("drain_null_1m"):
            self.drain("drain_null_1m", 1, history=rows)
            rows += self.scale.drain
        log(f"claim_ms_1m: {rounds} claims of {BATCH} with {rows} sent deliveries in the table")
        self.add("claim_ms_1m", round(self.measure_claims(rounds, "1m"), 3), "ms")
        self.add("claim_history_rows", rows, "rows")

    def measure_claims(self, rounds: int, tag: str) -> float:
        self.load((rounds + 1) * BATCH, f"claim-{tag}")
        self.analyze(vacuum=True)
        store = self.outbox.store
        seen: set[uuid.UUID] = set()
        times: list[float] = []
        for r in range(rounds + 1):
            start = time.perf_counter()
            with self.engine.begin() as conn:
                claimed = store.claim_due(conn, limit=BATCH, worker="bench", lease_seconds=300)
            elapsed = time.perf_counter() - start
            self.check(len(claimed) == BATCH, f"claim {tag}: got {len(claimed)}, not {BATCH}")
            fresh = {c.delivery_id for c in claimed}
            self.check(not fresh & seen, f"claim {tag}: a delivery was claimed twice")
            seen |= fresh
            if r:  # the first claim warms up (statement compilation, caches)
                times.append(elapsed * 1000)
        return statistics.median(times)

    def generate_history(self, rows: int) -> None:
        """`rows` sent deliveries (payload, recipient, one 'sent' attempt each), in bulk.

        Generated with INSERT ... SELECT generate_series. The rows are consistent by
        construction, so where the role may (superuser) the inserts skip the
        foreign-key triggers (session_replication_role = replica), which takes the
        generation of 1M rows from minutes to seconds. History bodies are short:
        the claim never reads the payloads of sent mail. The ids are version-7 UUIDs
        at each row's time, as mailoutbox makes them, so the history's indexes have
        the shape a real outbox's have.
        """
        s = f'"{self.schema}"'
        when = f"now() - interval '30 days' * (1 - g::float8 / {rows})"

        def time_ordered(kind: str) -> str:
            # A version-7 UUID as mailoutbox makes them (the delivery's from the client,
            # the others' from the server: statements.new_row_id), at the row's own time,
            # its random part from md5 so the same g gives the same id in each statement.
            digits = f"md5('{kind}' || g)"
            return (
                f"(lpad(to_hex((extract(epoch FROM {when}) * 1000)::int8), 12, '0') || '7' "
                f"|| substr({digits}, 1, 3) || '8' || substr({digits}, 4, 15))::uuid"
            )

        delivery = time_ordered("d")
        statements = [
            f"INSERT INTO {s}.mail_payloads (payload_id, content_type, subject, body, sender, "
            "headers, created_at) "
            f"SELECT {delivery}, 'text/plain', 'Your order #' || g || ' has shipped', "
            "convert_to('Your order #' || g || E' has shipped.\\n', 'UTF8'), "
            f"'{_common.SENDER}', '[]'::jsonb, {when} FROM generate_series(1, {rows}) g",
            f"INSERT INTO {s}.mail_deliveries (delivery_id, template_id, idempotency_key, "
            "status, attempts, next_attempt_at, payload_id, created_at, updated_at, sent_at, "
            "cycle_started_at) "
            f"SELECT {delivery}, '{_common.TEMPLATE}', 'history-' || g, 'sent', 1, "
            f"NULL, {delivery}, t, t, t, t "
            f"FROM (SELECT g, {when} AS t FROM generate_series(1, {rows}) g) x",
            f"INSERT INTO {s}.mail_recipients (recipient_id, delivery_id, address, kind, position) "
            f"SELECT {time_ordered('r')}, {delivery}, 'customer' || g || '@example.com', "
            f"'to', 0 FROM generate_series(1, {rows}) g",
            f"INSERT INTO {s}.mail_attempts (attempt_id, delivery_id, attempt_no, started_at, "
            "finished_at, outcome, error, worker) "
            f"SELECT {time_ordered('a')}, {delivery}, 1, {when}, {when}, 'sent', '', "
            f"'history' FROM generate_series(1, {rows}) g",
        ]
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
                for statement in statements:
                    conn.execute(sa.text(statement))
        except sa.exc.ProgrammingError:  # not allowed to skip the triggers: run them
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.execute(sa.text(statement))
        self.analyze(vacuum=True)
        with contextlib.suppress(sa.exc.DBAPIError):
            self.autocommit("CHECKPOINT")

    # the whole run

    def run(self) -> None:
        version = self.sql("SHOW server_version_num")[0][0]
        self.add("server_version_num", int(version), "PostgreSQL")
        # Other work on the machine skews every figure; say how busy it was.
        self.add("load_avg_1m_start", round(os.getloadavg()[0], 2), "runnable tasks")
        if self.wanted("enqueue_single"):
            self.enqueue_single()
        if self.wanted("enqueue_single_commit_ceiling"):
            self.enqueue_single_commit_ceiling()
        if self.wanted("enqueue_single_db_ceiling"):
            self.enqueue_single_db_ceiling()
        self.add_ratio(
            "enqueue_single_of_db_ceiling", "enqueue_single", "enqueue_single_db_ceiling"
        )
        if self.wanted("enqueue_many"):
            self.enqueue_many()
        if self.wanted("enqueue_many_db_ceiling"):
            self.enqueue_many_db_ceiling()
        self.add_ratio("enqueue_many_of_db_ceiling", "enqueue_many", "enqueue_many_db_ceiling")
        if self.wanted("drain_null", "peer_pgqueuer_drain", "drain_vs_pgqueuer"):
            self.compare_with_peer()
        if self.wanted("drain_null_2proc"):
            self.drain("drain_null_2proc", 2)
        if self.wanted("smtp_loopback"):
            self.smtp()
        if self.wanted("latency_p50_ms", "latency_p99_ms"):
            self.latency()
        if self.wanted("claim_ms_empty", "claim_ms_1m", "drain_null_1m"):
            self.claim()
        self.add("load_avg_1m_end", round(os.getloadavg()[0], 2), "runnable tasks")


def median_round(rounds: Sequence[Drained]) -> Drained:
    """The round whose rate is the median (the lower middle one of an even count)."""
    by_rate = sorted(rounds, key=lambda d: d.rate)
    return by_rate[(len(by_rate) - 1) // 2]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, int(-(-len(sorted_values) * p // 100)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- output -----------------------------------------------------------------------------


def format_value(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3f}"


def target_status(figure: Figure, figures: dict[str, Figure]) -> tuple[str, str]:
    if figure.name == "claim_ms_1m" and "claim_ms_empty" in figures:
        limit = 2 * figures["claim_ms_empty"].value
        return "<= 2x claim_ms_empty", "met" if figure.value <= limit else "MISSED"
    if figure.name not in TARGETS:
        return "", ""
    op, threshold, text = TARGETS[figure.name]
    met = figure.value >= threshold if op == ">=" else figure.value <= threshold
    return text, "met" if met else "MISSED"


def print_table(figures: list[Figure], title: str, stream: Any) -> None:
    by_name = {f.name: f for f in figures}
    rows = [(f.name, format_value(f.value), f.unit, *target_status(f, by_name)) for f in figures]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [
            max(len(r[i]) for r in [*rows, ("figure", "value", "unit", "target", "")])
            for i in range(5)
        ]
        print(title, file=stream)
        header = ("figure", "value", "unit", "target", "")
        for row in [header, *rows]:
            cells = [
                row[0].ljust(widths[0]),
                row[1].rjust(widths[1]),
                *(c.ljust(w) for c, w in zip(row[2:], widths[2:], strict=True)),
            ]
            print("  ".join(cells).rstrip(), file=stream)
        return
    table = Table(title=title)
    table.add_column("figure", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("target")
    table.add_column("")
    for row in rows:
        table.add_row(*row)
    Console(file=stream, width=110).print(table)


def emit_json(figures: list[Figure], verified: bool) -> None:
    for f in figures:
        print(json.dumps({"name": f.name, "value": f.value, "unit": f.unit}))
    print(json.dumps({"name": "verified", "value": 1 if verified else 0, "unit": "bool"}))
    sys.stdout.flush()


# --- main -------------------------------------------------------------------------------


@contextlib.contextmanager
def database(url: str | None) -> Iterator[tuple[sa.URL, str]]:
    if url:
        yield _common.psycopg_url(url), "given"
        return
    from mailoutbox.embedded import embedded_postgres

    log("starting the embedded PostgreSQL")
    with embedded_postgres(prefix="mailoutbox-bench-pg-") as embedded:
        yield embedded, "embedded"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down run (under a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--database-url", help="PostgreSQL URL (default: embedded server)")
    parser.add_argument("--only", help="comma-separated figure names to measure")
    parser.add_argument(
        "--profile", metavar="DIR", help="write a pyinstrument profile of the drain workers"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scale = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else None
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    schema = f"bench_{secrets.token_hex(4)}"
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="mailoutbox-bench-") as tmp,
        database(args.database_url) as (url, source),
    ):
        engine = sa.create_engine(url, pool_size=THREADS + 4, max_overflow=THREADS)
        bench: Bench | None = None
        try:
            log(
                f"database: {url.render_as_string(hide_password=True)} ({source}); "
                f"schema {schema}; {'quick' if args.quick else 'full'} run"
            )
            mailoutbox.migrate(engine, schema=schema)
            bench = Bench(engine, url, schema, scale, Path(tmp), only, profile_dir)
            bench.run()
        finally:
            close_children()
            with contextlib.suppress(Exception), engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
    assert bench is not None
    log(f"finished in {time.perf_counter() - started:.1f}s")
    verified = not bench.problems
    figures = bench.figures
    if verified:
        if only is None or bench.verified_deliveries:
            figures = [
                *figures,
                Figure("verified_deliveries", bench.verified_deliveries, "deliveries"),
            ]
        if args.json:
            emit_json(figures, verified=True)
        else:
            print_table(
                figures,
                f"mailoutbox benchmark ({'quick' if args.quick else 'full'}, {source} PostgreSQL)",
                sys.stdout,
            )
        return 0
    log("verification FAILED:")
    for problem in bench.problems:
        log(f"  - {problem}")
    print_table(figures, "UNVERIFIED figures", sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
