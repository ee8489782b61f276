"""The curate stage on Ray: a hostile corpus is 100 % accounted for; Parquet input works too."""
from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.cli import main
from tasks.store import Storage
from tests.conftest import write_pipeline
from tests.hostile import HOSTILE_LIMITS, make_hostile_corpus


def _limits():
    return [f"--set=curate.{k}={v}" for k, v in HOSTILE_LIMITS.items()]


def test_hostile_corpus_fully_accounted(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    expected = make_hostile_corpus(str(corpus))
    pipe = write_pipeline(tmp_path / "p.yaml", {"curate": {"input": str(corpus)}})
    storage = tmp_path / "s"
    assert main(["stage", "curate", str(pipe), "--storage", str(storage), *_limits()]) == 0
    st = Storage(str(storage))
    man = st.manifest("curate")
    c = man["counts"]
    assert c["seen"] == len(expected) == c["kept"] + c["duplicates"] + c["quarantined"]
    kept = {os.path.relpath(s, corpus) for s in st.read_table("curate")["source"].to_pylist()}
    dups = {os.path.relpath(s, corpus) for s in st.read_table("curate", "duplicates")["source"].to_pylist()}
    q = st.read_table("curate", "quarantine")
    assert {"source", "reason"} <= set(q.column_names)
    reasons = {os.path.relpath(s, corpus): r for s, r in zip(q["source"].to_pylist(), q["reason"].to_pylist())}
    for rel, outcome in expected.items():
        if outcome == "ok":
            assert rel in kept, rel
        elif outcome == "duplicate":
            assert rel in dups or rel in kept, rel
        else:
            assert rel in reasons, (rel, outcome)
            assert reasons[rel].split(":")[0] == outcome, (rel, reasons[rel])
    assert all(r.strip() for r in reasons.values())  # every rejection says why
    # decoded images are RGB and within the size policy
    for b in st.read_table("curate")["image"].to_pylist():
        with Image.open(io.BytesIO(b)) as im:
            assert im.mode == "RGB" and max(im.size) <= HOSTILE_LIMITS["max_side"]


def test_parquet_input_with_label_column(ray_local, tmp_path):
    rows = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (20 + i, 16), (40 * i, 10, 200)).save(buf, format="PNG")
        rows.append({"name": f"img{i}", "image": buf.getvalue(), "cls": "a" if i % 2 else "b"})
    rows.append({"name": "broken", "image": b"not an image", "cls": "a"})
    rows.append({"name": "copy", "image": rows[0]["image"], "cls": "b"})
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    pipe = write_pipeline(tmp_path / "p.yaml", {"curate": {"input": str(path), "labels": "column:cls"}})
    assert main(["stage", "curate", str(pipe), "--storage", str(tmp_path / "s")]) == 0
    st = Storage(str(tmp_path / "s"))
    c = st.manifest("curate")["counts"]
    assert c == {"seen": 8, "kept": 6, "duplicates": 1, "quarantined": 1}
    t = st.read_table("curate")
    assert sorted(set(t["label"].to_pylist())) == ["a", "b"]
    q = st.read_table("curate", "quarantine")
    assert q["source"].to_pylist() == ["broken"] and q["reason"][0].as_py().startswith("not_an_image")
