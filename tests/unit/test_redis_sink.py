"""The Redis sink's buffer policy for erasures (no thread, no Redis)."""

from __future__ import annotations

from sinks.redis_sink import RedisJourneySink
from touchpoint.config import RedisSettings


class NoRedis:
    def register_script(self, _script: str) -> None:
        return None


def sink(max_pending: int) -> RedisJourneySink:
    return RedisJourneySink(RedisSettings(max_pending=max_pending), client=NoRedis())


def test_a_full_buffer_never_drops_an_erasure() -> None:
    s = sink(2)
    s.submit({"erased": None, "closed": None}, erased=["erased"])
    s.submit({"live-1": b"1", "live-2": b"2"})
    assert s._pending == {"erased": None, "closed": None}  # values go first
    s.submit({"closed-2": None, "live-3": b"3", "live-4": b"4"})
    # Then the oldest plain deletions; never the erasure.
    assert s._pending == {"erased": None, "closed-2": None}
    # The customer came back before Redis did: the new value replaces the
    # pending deletion and is kept too (Redis still holds the erased journey).
    s.submit({"erased": b"new"})
    s.submit({f"live-{i}": b"x" for i in range(10, 20)})
    assert s._pending["erased"] == b"new"


def test_an_erasure_is_protected_until_a_write_after_it_reaches_redis() -> None:
    s = sink(1)
    s.submit({"alice": None}, erased=["alice"])
    batch = s._take()
    s._restore(batch)  # the write failed
    s.submit({"live-1": b"1"})
    assert s._pending == {"alice": None}  # still there, over the bound
    batch = s._take()
    s.submit({"alice": None}, erased=["alice"])  # erased again meanwhile
    s._written()  # the first write reached Redis, not the second erasure
    s.submit({"live-2": b"2"})
    assert s._pending == {"alice": None}
    s._take()
    s._written()
    assert s._erased == {}
    # Done: a later plain deletion of the same key may be dropped again.
    s.submit({"alice": None})
    s.submit({"closed": None})
    assert s._pending == {"closed": None}
