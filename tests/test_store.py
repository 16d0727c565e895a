import asyncio
import sqlite3
import threading

import pytest

from relay.store import EventRow, Store, has_database, is_url, open_store
from tests.conftest import DATABASE_ERRORS


def test_a_failing_work_in_mid_batch_leaves_nothing_and_runs_once_while_the_others_commit(store_target):
    store = open_store(store_target)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(5))  # hold the writer so the next works queue up into one batch
    runs = []

    def half_then_fail(conn):
        runs.append(1)
        Store.events_work([EventRow("Send", "t", "half", None, None, {})])(conn)
        raise ValueError("refused")

    before = [store.submit(Store.events_work([EventRow("Send", "t", f"a{i}", None, None, {})])) for i in range(3)]
    bad = store.submit(half_then_fail)
    after = [store.submit(Store.events_work([EventRow("Send", "t", f"b{i}", None, None, {})])) for i in range(3)]
    gate.set()
    assert all(f.result(5) is None for f in before + after)
    with pytest.raises(ValueError, match="refused"):
        bad.result(5)
    assert runs == [1]
    assert [r[0] for r in store.query("SELECT message_id FROM events ORDER BY id")] == [
        "a0", "a1", "a2", "b0", "b1", "b2"]
    store.close()


def test_group_commit_batches_and_isolates_failures(store_target):
    store = open_store(store_target)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(5))  # hold the writer so the next works queue up into one batch
    ok = [store.submit(Store.events_work([EventRow("Send", "t", f"m{i}", None, None, {"i": i})])) for i in range(50)]
    bad = store.submit(lambda conn: conn.execute("INSERT INTO nope VALUES (1)"))
    gate.set()
    assert all(f.result(5) is None for f in ok)
    with pytest.raises(DATABASE_ERRORS, match="nope"):
        bad.result(5)
    assert len(store.events()) == 50
    store.close()
    if not is_url(store_target):
        conn = sqlite3.connect(store_target)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_async_write_and_close_drains(store_target):
    store = open_store(store_target)

    async def main():
        await asyncio.gather(*(store.write(Store.events_work([EventRow("Open", "t", "m", "r", None, {})]))
                               for _ in range(20)))

    asyncio.run(main())
    for _ in range(10):
        store.submit(Store.events_work([EventRow("Click", "t", "m", "r", None, {})]))
    store.close()
    reopened = open_store(store_target)
    assert len(reopened.events(event_type="Click")) == 10
    reopened.close()
    assert reopened.submit(lambda c: None).exception() is not None  # closed stores refuse work


def test_a_caller_that_gives_up_does_not_stop_the_writer(store_target):
    store = open_store(store_target)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(5))
    abandoned = store.submit(Store.events_work([EventRow("Send", "t", "gone", None, None, {})]))
    assert abandoned.cancel()  # cancelled while queued, as asyncio does when its task is cancelled
    gate.set()
    later = store.submit(Store.events_work([EventRow("Send", "t", "later", None, None, {})]))
    assert later.result(5) is None
    assert len(store.events()) == 2  # the abandoned work was still done: its outcome may matter
    store.close()


def test_cancelled_async_write_is_harmless(store_target):
    store = open_store(store_target)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(5))

    async def main():
        task = asyncio.ensure_future(store.write(Store.events_work([EventRow("Open", "t", "m", "r", None, {})])))
        await asyncio.sleep(0.05)
        task.cancel()
        gate.set()
        await asyncio.sleep(0.05)
        return await store.write(lambda conn: conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    assert asyncio.run(main()) == 1
    store.close()


def test_has_database_is_a_sqlite_file_that_exists_or_any_postgresql_url(tmp_path):
    path = tmp_path / "relay.sqlite3"
    assert not has_database(path)  # a command that only reads must not make an empty one
    open_store(path).close()
    assert has_database(path)
    assert has_database("postgresql://relay@db.example/relay")  # the server answers for it when opened
