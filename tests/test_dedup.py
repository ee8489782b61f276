"""Exact dedup by content hash: list and Arrow versions agree, first-by-source wins, order-independent."""
from __future__ import annotations

import random

import pyarrow as pa

from tasks.curation.dedup import DUP_SCHEMA, dedup, dedup_table

ROWS = [
    {"id": "h1", "source": "b/2.png", "image": b"x", "label": "b"},
    {"id": "h2", "source": "a/9.png", "image": b"y", "label": "a"},
    {"id": "h1", "source": "a/1.png", "image": b"x", "label": "a"},
    {"id": "h1", "source": "c/3.png", "image": b"x", "label": "c"},
    {"id": "", "source": "d/0.png", "image": b"z", "label": "d"},
    {"id": "", "source": "d/1.png", "image": b"w", "label": "d"},
    {"id": "h3", "source": "e/5.png", "image": b"v", "label": "e"},
]
EXPECT_KEPT = ["a/1.png", "a/9.png", "d/0.png", "d/1.png", "e/5.png"]
EXPECT_DUPS = [
    {"source": "b/2.png", "reason": "duplicate: same content as a/1.png", "id": "h1"},
    {"source": "c/3.png", "reason": "duplicate: same content as a/1.png", "id": "h1"},
]


def test_dedup_list():
    kept, dups = dedup(ROWS)
    assert [r["source"] for r in kept] == EXPECT_KEPT
    assert kept[0] == ROWS[2]  # whole record is kept untouched
    assert dups == EXPECT_DUPS


def test_dedup_is_order_independent():
    rng = random.Random(0)
    for _ in range(5):
        rows = ROWS[:]
        rng.shuffle(rows)
        kept, dups = dedup(rows)
        assert [r["source"] for r in kept] == EXPECT_KEPT and dups == EXPECT_DUPS
        kt, dt = dedup_table(pa.Table.from_pylist(rows))
        assert kt.column("source").to_pylist() == EXPECT_KEPT and dt.to_pylist() == EXPECT_DUPS


def test_dedup_table_matches_list_and_keeps_columns():
    table = pa.Table.from_pylist(ROWS)
    kept, dups = dedup_table(table)
    assert kept.schema == table.schema
    assert kept.to_pylist() == dedup(ROWS)[0]
    assert dups.schema == DUP_SCHEMA and dups.to_pylist() == EXPECT_DUPS
    k2, d2 = dedup(table)  # dispatches on type
    assert k2.equals(kept) and d2.equals(dups)


def test_dedup_table_edge_cases():
    empty = pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string())})
    kept, dups = dedup_table(empty)
    assert kept.num_rows == 0 and dups.num_rows == 0 and dups.schema == DUP_SCHEMA
    nulls = pa.table({"id": [None, None, "a"], "source": ["x", "y", "z"]})
    kept, dups = dedup_table(nulls)
    assert kept.num_rows == 3 and dups.num_rows == 0
    chunked = pa.concat_tables([pa.Table.from_pylist(ROWS[:3]), pa.Table.from_pylist(ROWS[3:])])
    kept, dups = dedup_table(chunked)
    assert kept.column("source").to_pylist() == EXPECT_KEPT and dups.to_pylist() == EXPECT_DUPS
    unique = pa.table({"id": ["a", "b"], "source": ["2", "1"]})
    kept, dups = dedup_table(unique)
    assert kept.column("source").to_pylist() == ["1", "2"] and dups.num_rows == 0
