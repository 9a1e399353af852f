"""Run the Alembic migrations (the only way Bastion's schema is created).

Alembic is imported only inside these functions: the serving process asks for
the schema's revisions through `revisions_in_child`, so it never loads Alembic
(about 10 MB of resident memory, counted against the gateway's memory budget
in bench/suite).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    import asyncio

    from alembic.runtime.migration import MigrationContext

    from gateway.db import create_engine

    async def read() -> str | None:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
        finally:
            await engine.dispose()

    return asyncio.run(read())


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


class RevisionsUnreadable(Exception):
    """The child could not read the database's revision; the message says why."""


def revisions_in_child(database_url: str) -> tuple[str | None, str]:
    """(current, head), read by a child process so this one never imports Alembic."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.migrate", "revisions"],
        input=database_url,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RevisionsUnreadable(lines[-1] if lines else f"exit status {done.returncode}")
    found = json.loads(done.stdout)
    return found["current"], found["head"]


def _main() -> None:
    # `python -m gateway.migrate revisions`, the URL on stdin (it may hold a password).
    if sys.argv[1:] != ["revisions"]:
        sys.exit("usage: python -m gateway.migrate revisions  (database URL on stdin)")
    url = sys.stdin.read().strip()
    print(json.dumps({"current": current_revision(url), "head": head_revision()}))


if __name__ == "__main__":
    _main()
