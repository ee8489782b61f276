"""Exact de-duplication by content hash (the ``id`` column, SHA-256 of the original file bytes).

Within each group of equal ids the record with the smallest ``source`` is kept, whatever the input
order, so results do not depend on how a distributed read interleaved the files. Kept rows come back
sorted by ``source``; each duplicate row carries ``source``, ``id`` and
``reason = "duplicate: same content as <kept source>"``. Rows with an empty/missing id are never
considered duplicates.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DUPLICATE = "duplicate"
DUP_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("id", pa.string())])


def _reason(kept_source: str) -> str:
    return f"{DUPLICATE}: same content as {kept_source}"


def dedup(records: Sequence[dict] | pa.Table) -> tuple[Any, Any]:
    """Exact dedup. A list of dicts gives (kept list, duplicate list); a pa.Table goes to dedup_table."""
    if isinstance(records, pa.Table):
        return dedup_table(records)
    rows = list(records)
    order = sorted(range(len(rows)), key=lambda i: (str(rows[i].get("source", "")), i))
    first_source: dict[str, str] = {}
    kept: list[dict] = []
    dups: list[dict] = []
    for i in order:
        rec = rows[i]
        key = rec.get("id") or ""
        src = str(rec.get("source", ""))
        if key and key in first_source:
            dups.append({"source": src, "reason": _reason(first_source[key]), "id": key})
            continue
        if key:
            first_source[key] = src
        kept.append(rec)
    return kept, dups


def dedup_table(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Vectorised dedup of a table with string columns ``id`` and ``source``.

    Returns (kept rows, all original columns, sorted by source; duplicates with schema DUP_SCHEMA).
    Only the id/source columns are materialised in Python-free Arrow/NumPy arrays; image bytes are
    only touched by the final ``take``.
    """
    n = table.num_rows
    if n == 0:
        return table, DUP_SCHEMA.empty_table()
    ids = table.column("id").combine_chunks().cast(pa.string())
    sources = table.column("source").combine_chunks().cast(pa.string())
    ids = pc.fill_null(ids, "")
    sources = pc.fill_null(sources, "")
    keys = pa.table({"id": ids, "source": sources, "row": pa.array(np.arange(n, dtype=np.int64))})
    order = pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    order_np = order.to_numpy()
    sorted_ids = ids.take(order)
    sorted_src = sources.take(order)
    id_np = np.asarray(sorted_ids.to_numpy(zero_copy_only=False), dtype=object)

    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = id_np[1:] != id_np[:-1]
    starts |= id_np == ""  # empty ids are never duplicates of each other
    group = np.cumsum(starts) - 1
    first_pos = np.flatnonzero(starts)

    kept_rows = order_np[starts]
    dup_pos = np.flatnonzero(~starts)
    kept_tbl = table.take(pa.array(kept_rows))
    kept_tbl = kept_tbl.take(
        pc.sort_indices(
            pa.table({"source": sources.take(pa.array(kept_rows)), "row": pa.array(kept_rows)}),
            sort_keys=[("source", "ascending"), ("row", "ascending")],
        )
    )
    if dup_pos.size == 0:
        return kept_tbl, DUP_SCHEMA.empty_table()
    dup_src = sorted_src.take(pa.array(dup_pos))
    owner = sorted_src.take(pa.array(first_pos[group[dup_pos]]))
    reasons = pc.binary_join_element_wise(pa.scalar(_reason("")), owner, "")
    dups = pa.table({"source": dup_src, "reason": reasons, "id": sorted_ids.take(pa.array(dup_pos))}, schema=DUP_SCHEMA)
    dups = dups.sort_by([("source", "ascending")])
    return kept_tbl, dups
