"""Dagster instances for the platform tests: the embedded SQLite default, or a fresh PostgreSQL database.

``PHENOCODER_TEST_POSTGRES_URL`` (e.g. ``postgresql://postgres@127.0.0.1:55432/postgres``, set by
``.ci/run``) names a server the tests may create databases on; each instance gets its own database.
Without it the PostgreSQL variants are skipped locally, and fail in CI (``CI=true``), where the
server is always started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sqlite3
import uuid
from pathlib import Path

import pytest

POSTGRES_ENV = "PHENOCODER_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgres"]
# Launched runs must execute without the daemon: the default run launcher behind a DefaultRunCoordinator.
DEMO_DAGSTER_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher
  class: DefaultRunLauncher
telemetry:
  enabled: false
"""


def postgres_url() -> str:
    """The server URL, or skip (locally) / fail (in CI) when it is not set."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        message = f"{POSTGRES_ENV} is not set: no PostgreSQL server to run the instance tests on (.ci/run starts one)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must run them.")
        pytest.skip(message)
    return url


def _create_database(server_url: str, prefix: str, template: str | None = None) -> str:
    """``CREATE DATABASE`` (optionally a copy of ``template``) on the server of ``server_url``; its URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                            dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


def fresh_database(prefix: str = "phenocoder_test") -> str:
    """Create an empty database on the test server and return its URL."""
    return _create_database(postgres_url(), prefix)


def clone_database(url: str, prefix: str = "phenocoder_copy") -> str:
    """A new database on the same server holding a copy of the database at ``url``; its URL.

    PostgreSQL copies a database only while nobody is connected to it; Dagster's PostgreSQL storage
    holds no idle connections (a null pool), so a finished instance can be copied.
    """
    from sqlalchemy.engine import make_url

    return _create_database(url, prefix, template=make_url(url).database)


def storage_yaml(backend: str) -> str:
    """The ``storage:`` block of a dagster.yaml for ``backend`` (empty for SQLite, the default)."""
    if backend == "sqlite":
        return ""
    if backend == "postgres":
        return f'storage:\n  postgres:\n    postgres_url: "{fresh_database()}"\n'
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


def write_instance(dagster_home: Path, backend: str, extra: str = "telemetry:\n  enabled: false\n") -> Path:
    """Write ``dagster_home/dagster.yaml`` for ``backend`` (plus ``extra`` settings); return the folder."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(storage_yaml(backend) + extra)
    return dagster_home


@pytest.fixture(params=BACKENDS)
def make_instance(request):
    """``make_instance()``: a context manager yielding a temporary instance on each backend in turn."""
    from dagster import instance_for_test

    if request.param == "sqlite":
        return instance_for_test
    url = fresh_database()
    return lambda: instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}})


def copy_home(demo, dest: Path):
    """A copy of the demo's home at ``dest``: files, Dagster instance and MLflow store, with the home's path
    in the MLflow database and the JSON records rewritten, so that nothing written to the copy reaches the
    original (MLflow keeps absolute artifact locations)."""
    old, new = str(demo.home), str(dest)
    shutil.copytree(demo.home, dest, symlinks=True)
    for path in dest.rglob("*.json"):
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
    with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                               f'WHERE instr("{column[1]}", ?) > 0', (old, new, old))
    # a PostgreSQL instance keeps its runs in a database, not in the home: the copy gets its own database
    dagster_yaml = dest / demo.dagster_home.relative_to(demo.home) / "dagster.yaml"
    url = re.search(r'postgres_url: "([^"]+)"', dagster_yaml.read_text())
    if url:
        dagster_yaml.write_text(dagster_yaml.read_text().replace(url.group(1), clone_database(url.group(1))))
    return dataclasses.replace(demo, home=dest, dagster_home=dest / demo.dagster_home.relative_to(demo.home),
                               plate_dir=dest / demo.plate_dir.relative_to(demo.home))
