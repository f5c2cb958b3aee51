"""Keys must land where Faust (aiokafka) and librdkafka's murmur2 partitioner put them."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.bundles import Partitioner


@settings(max_examples=2_000)
@given(key=st.text(min_size=0, max_size=80), partitions=st.integers(1, 64))
def test_partitioner_agrees_with_aiokafka(key: str, partitions: int) -> None:
    expected = DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))
    assert Partitioner(partitions)(key) == expected


def test_partitioner_spreads_customer_ids() -> None:
    rng = random.Random(3)
    part = Partitioner(8)
    counts = [0] * 8
    for _ in range(8_000):
        counts[part(f"cust-{rng.randrange(10**9):09d}")] += 1
    assert min(counts) > 800, counts


def test_partitioner_memo_is_bounded_and_agrees_on_hits_and_misses() -> None:
    part = Partitioner(16, cache_size=100)
    keys = [f"cust-{i}" for i in range(1_000)]
    fresh = [Partitioner(16, cache_size=0)(k) for k in keys]
    for _ in range(2):  # second pass: hits for the last keys, misses after each clear
        assert [part(k) for k in keys] == fresh
        assert 0 < len(part.cache) <= 100
