"""The built wheel carries its migrations: install it in a clean venv and migrate from there."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys, sqlalchemy as sa, mailoutbox
assert sys.prefix in mailoutbox.__file__, mailoutbox.__file__
engine = sa.create_engine(sys.argv[1], poolclass=sa.pool.NullPool)
mailoutbox.migrate(engine, schema="from_wheel")
mailoutbox.migrate(engine, schema="from_wheel")
outbox = mailoutbox.Outbox(engine, schema="from_wheel", default_sender="a@example.com")
print(outbox.enqueue(mailoutbox.Mail(template_id="t", idempotency_key="k", to="b@example.com",
                                     text="hi")).created)
engine.dispose()
"""


def test_wheel_installs_in_a_clean_venv_and_migrates(tmp_path: Path, empty_db_url: sa.URL) -> None:
    """A wheel built from this tree migrates a database using only what it ships."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    [wheel] = dist.glob("mailoutbox-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The wheel itself goes into the clean venv; its dependencies (SQLAlchemy, psycopg,
    # alembic) are borrowed from this environment so the test needs no network.
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "mailoutbox/alembic/env.py" in names
        assert any(n.startswith("mailoutbox/alembic/versions/") for n in names)
        archive.extractall(site)
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = subprocess.run(
        [python, "-I", "-c", CHECK, empty_db_url.render_as_string(hide_password=False)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
