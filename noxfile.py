"""Developer sessions: nox -s tests lint typecheck wheel."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6,<1")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it (not the checkout) and migrate from it."""
    session.install("-e", ".[dev]")
    session.run("pytest", "tests/test_wheel.py")
