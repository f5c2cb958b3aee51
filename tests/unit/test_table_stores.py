"""The worker's state stores page through a partition in key order (the expiry scan)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rocksdict import Options, Rdict

from streams.app import RocksTableStore
from streams.bundles import Partitioner
from streams.journeys import META_PREFIX, DictStore


def _rocks(tmp_path: Path) -> tuple[RocksTableStore, Rdict]:
    db = Rdict(str(tmp_path / "p0"), options=Options(raw_mode=True))
    faust_store = SimpleNamespace(_dbs={0: db}, _db_for_partition=lambda partition: db)
    return RocksTableStore(SimpleNamespace(data=faust_store)), db


def _walk(store: Any, limit: int) -> list[bytes]:
    seen: list[bytes] = []
    after = None
    while True:
        page = store.page(0, after, limit)
        seen += [key for key, _value in page]
        if len(page) < limit:
            return seen
        after = page[-1][0]


def test_rocksdb_pages_visit_every_state_once_in_key_order(tmp_path: Path) -> None:
    store, db = _rocks(tmp_path)
    keys = [f"cust-{i:03d}".encode() for i in range(23)]
    for key in reversed(keys):
        store.put(key, 0, b"state-" + key)
    store.put(b"__faust\0offset__", 0, b"42")  # Faust's own key: never a state
    store.commit()
    for limit in (1, 3, 23, 100):
        assert _walk(store, limit) == sorted(keys)
    [(key, value)] = store.page(0, b"cust-021", 1)
    assert (key, value) == (b"cust-022", b"state-cust-022")
    memory = store.memory()
    assert set(memory) >= {"memtables", "block_cache", "table_readers"}
    assert memory["memtables"] > 0  # the writes above sit in the memtable
    db.close()


def test_dict_store_pages_visit_every_state_of_the_partition_once(tmp_path: Path) -> None:
    partition_of = Partitioner(2)
    store = DictStore(partition_of)
    keys = [f"cust-{i:03d}" for i in range(40)]
    for key in keys:
        store.put(key.encode(), partition_of(key), b"x")
    store.put(META_PREFIX + b"0", 0, b"meta")
    mine = sorted(k.encode() for k in keys if partition_of(k) == 0)
    assert 0 < len(mine) < len(keys)
    walked = _walk(store, 4)
    assert [k for k in walked if not k.startswith(META_PREFIX)] == mine
