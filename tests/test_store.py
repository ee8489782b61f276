"""The stage contract: atomic commit, manifest fields, deterministic content hashes."""
from __future__ import annotations

import json
import os

import pyarrow as pa

from tasks.store import MANIFEST, Storage, cache_key


def _table(ids):
    return pa.table({"id": [str(i) for i in ids], "v": [float(i) for i in ids]})


def test_commit_writes_shards_and_manifest(tmp_path):
    st = Storage(str(tmp_path))
    w = st.writer("s")
    w.shard_rows = 3
    w.write_table("data", _table(range(7)))
    w.write_file("extra.bin", b"abc")
    man = w.commit({"cache_key": "k", "counts": {"n": 7}})
    assert man["rows"] == 7 and len(man["tables"]["data"]["files"]) == 3
    assert st.manifest("s")["content_hash"] == man["content_hash"]
    assert st.read_table("s").num_rows == 7 and st.read_file("s", "extra.bin") == b"abc"
    assert not any(n.startswith("s-") for n in os.listdir(tmp_path / ".staging"))


def test_uncommitted_output_is_invisible(tmp_path):
    st = Storage(str(tmp_path))
    with st.writer("s") as w:
        w.write_table("data", _table(range(3)))
        # no commit: as if the stage was killed here
    assert not st.exists("s") and not (tmp_path / "s").exists()
    assert os.listdir(tmp_path / ".staging") == []


def test_killed_stage_keeps_previous_output(tmp_path):
    st = Storage(str(tmp_path))
    w = st.writer("s")
    w.write_table("data", _table(range(3)))
    first = w.commit({})
    w2 = st.writer("s")
    w2.write_table("data", _table(range(5)))  # killed before commit
    assert st.manifest("s")["content_hash"] == first["content_hash"]
    assert st.read_table("s").num_rows == 3


def test_content_hash_independent_of_row_order(tmp_path):
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    wa, wb = a.writer("s"), b.writer("s")
    wa.write_table("data", _table([3, 1, 2, 0]))
    wb.write_table("data", [_table([0, 2]), _table([1, 3])])
    assert wa.commit({})["content_hash"] == wb.commit({})["content_hash"]
    wc = a.writer("s")
    wc.write_table("data", _table([0, 1, 2, 4]))
    assert wc.commit({})["content_hash"] != b.manifest("s")["content_hash"]


def test_cache_key_changes_with_each_input():
    base = cache_key({"a": 1}, {"up": "h"}, "code")
    assert base == cache_key({"a": 1}, {"up": "h"}, "code")
    assert len({base, cache_key({"a": 2}, {"up": "h"}, "code"), cache_key({"a": 1}, {"up": "x"}, "code"),
                cache_key({"a": 1}, {"up": "h"}, "code2")}) == 4


def test_manifest_is_json_with_schema(tmp_path):
    st = Storage(str(tmp_path))
    w = st.writer("s")
    w.write_table("data", _table(range(2)))
    w.commit({"config": {"x": 1}})
    man = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert man["schema_version"] == 1 and "id: string" in man["tables"]["data"]["columns"]
    assert man["config"] == {"x": 1}
