"""Shared fixtures. The corpus in ../shared/corpus is optional: tests that use it skip when it is absent."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Programs installed beside this interpreter (a virtual environment's `aws`, `relay`) are found as if the
# environment were activated: the README runs the tests as `.venv/bin/python -m pytest`.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
CORPUS = Path(os.environ.get("RELAY_CORPUS", ROOT.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "eml").is_dir():
        pytest.skip(f"corpus not found at {CORPUS} (set RELAY_CORPUS)")
    return CORPUS


# --- the two store backends --------------------------------------------------------------------------------
# Storage-facing tests take `store_target` and run once on SQLite and once on PostgreSQL. PostgreSQL is the
# server on 127.0.0.1:5432 (trust authentication, user postgres) that CI starts; each test gets a database of
# its own, dropped after. Without a server the PostgreSQL runs skip with that reason.
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)  # what either backend raises for bad SQL or a lost database
PG_ADMIN_URL = os.environ.get("RELAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "sqlite_only(why): a test of SQLite itself (WAL, file permissions, a full"
                                       " disk, its progress handler): it has no PostgreSQL run")


@functools.cache
def postgres_unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {PG_ADMIN_URL}: {str(exc).strip().splitlines()[0]}"
    return None


# Operators' databases seldom sort text in byte order (en_US.UTF-8 is common): the storage-facing tests' databases
# sort as a person would, so SQL that holds only in byte order (a '~' sorting after letters) fails here too.
LINGUISTIC = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"


@contextlib.contextmanager
def postgres_database(template: str | None = None, options: str = "") -> Iterator[str]:
    """A new database on the test server, empty (`options`: CREATE DATABASE's) or a copy of `template`; its URL.
    Dropped afterwards, connections and all."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} " + (f"TEMPLATE {template}" if template else options))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def migrated_template() -> Iterator[str | None]:
    """The name of a database migrated to relay's schema once a session, which the storage-facing tests' databases
    copy (a file copy, where migrating each new database costs up to a second on a loaded machine), collation
    and all. Migrating an empty database, several nodes at once, is tests/test_nodes.py's. None without a
    server."""
    if postgres_unavailable():
        yield None
        return
    from relay.store import open_store

    with postgres_database(options=LINGUISTIC) as url:
        open_store(url).close()
        yield url.rsplit("/", 1)[1]


BACKENDS = ["sqlite", "postgresql"]
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)  # a constraint refused the row


@pytest.fixture(params=BACKENDS)
def store_target(request, tmp_path) -> Iterator[str | Path]:
    """Where a test's store lives: a SQLite file, or the URL of a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield tmp_path / "relay.sqlite3"
        return
    with postgres_database(request.getfixturevalue("migrated_template")) as url:
        yield url


@pytest.fixture
def store_url(store_target) -> str | None:
    """`store_target` as relay's configuration takes it: the PostgreSQL URL ([store] url, RelayProcess's
    store_url), or None for SQLite, which relay keeps under its data_dir."""
    return store_target if isinstance(store_target, str) else None


@pytest.fixture(scope="module", params=BACKENDS)
def module_store_url(request) -> Iterator[str | None]:
    """As `store_url`, for a module-scoped relay: its tests run once per backend, on one database each."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_database(request.getfixturevalue("migrated_template")) as url:
        yield url


@pytest.fixture
def backend_url(request) -> Iterator[str | None]:
    """As `store_url`, for a fixture most of whose tests are not about the store: SQLite (None) unless the test
    is marked `both_backends`."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
        return
    with postgres_database(request.getfixturevalue("migrated_template")) as url:
        yield url


both_backends = pytest.mark.parametrize("backend_url", BACKENDS, indirect=True)
sqlite_run_only = pytest.mark.parametrize("store_target", ["sqlite"], indirect=True)


def store_toml(url: str | None) -> str:
    """The [store] table of a configuration file for `store_url` (none for SQLite)."""
    return f'\n[store]\nurl = "{url}"\n' if url else ""
