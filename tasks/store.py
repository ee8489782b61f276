"""The stage contract: Parquet shards + ``manifest.json`` under a storage root, written atomically.

A stage output lives at ``<root>/<stage>/``. It is written under ``<root>/.staging/<stage>-<uuid>/`` and
moved into place only when complete; ``manifest.json`` is written last and is the commit marker, so a
reader never trusts a folder without one (that also covers filesystems without atomic directory rename).

Content hashes are deterministic: writers sort rows by ``id`` and cut fixed-size shards, so the same
logical content always gives the same files and the same hash, whatever the parallelism that made it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def cache_key(config: dict, upstream: dict[str, str], code_version: str) -> str:
    return stable_hash({"config": config, "upstream": upstream, "code": code_version})


class Storage:
    """A storage root on any pyarrow filesystem (local path, file://, s3://, gs://, hdfs://...)."""

    def __init__(self, uri: str):
        if "://" not in uri:
            uri = os.path.abspath(uri)
            os.makedirs(uri, exist_ok=True)
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.fs.create_dir(self.root, recursive=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.is_local else f"{self.uri.split('://')[0]}://{p}"

    # ------------------------------------------------------------------ reading
    def exists(self, stage: str) -> bool:
        return self.fs.get_file_info(self.path(stage, MANIFEST)).type == pafs.FileType.File

    def manifest(self, stage: str) -> dict | None:
        if not self.exists(stage):
            return None
        with self.fs.open_input_stream(self.path(stage, MANIFEST)) as f:
            return json.loads(f.read().decode())

    def read_table(self, stage: str, table: str = "data", columns: list[str] | None = None) -> pa.Table:
        man = self.manifest(stage)
        if man is None:
            raise FileNotFoundError(f"stage {stage!r} has no committed output under {self.uri}")
        files = [f["path"] for f in man["tables"][table]["files"]]
        if not files:
            return man_schema_empty(man["tables"][table]["schema"])
        return pa.concat_tables(pq.read_table(self.path(stage, p), columns=columns, filesystem=self.fs) for p in files)

    def iter_batches(self, stage: str, table: str = "data", columns=None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        man = self.manifest(stage)
        for f in man["tables"][table]["files"]:
            pf = pq.ParquetFile(self.fs.open_input_file(self.path(stage, f["path"])))
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def table_paths(self, stage: str, table: str = "data") -> list[str]:
        man = self.manifest(stage)
        return [self.uri_of(stage, f["path"]) for f in man["tables"][table]["files"]]

    def read_file(self, stage: str, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(stage, name)) as f:
            return f.read()

    # ------------------------------------------------------------------ writing
    def writer(self, stage: str) -> "StageWriter":
        return StageWriter(self, stage)


def man_schema_empty(schema_json: str) -> pa.Table:
    import base64

    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema_json)))
    return schema.empty_table()


def _schema_b64(schema: pa.Schema) -> str:
    import base64

    return base64.b64encode(schema.serialize().to_pybytes()).decode()


@dataclass
class _TableState:
    schema: pa.Schema | None = None
    files: list = field(default_factory=list)
    rows: int = 0
    pending: list = field(default_factory=list)
    pending_rows: int = 0


class StageWriter:
    """Collects tables and files for one stage output, then commits them atomically.

    Usage::

        with storage.writer("curate") as w:
            w.write_table("data", table)          # any number of calls; rows are sorted by id per table
            w.write_file("encoder.pt", blob)
            w.commit(manifest_fields)             # without commit, nothing becomes visible
    """

    def __init__(self, storage: Storage, stage: str, shard_rows: int = 512):
        self.storage, self.stage, self.shard_rows = storage, stage, shard_rows
        self.tmp_rel = f".staging/{stage}-{uuid.uuid4().hex[:12]}"
        self.tmp = storage.path(self.tmp_rel)
        storage.fs.create_dir(self.tmp, recursive=True)
        self.tables: dict[str, _TableState] = {}
        self.extra_files: dict[str, str] = {}
        self.committed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.committed:
            self.abort()
        return False

    def abort(self) -> None:
        try:
            self.storage.fs.delete_dir(self.tmp)
        except (FileNotFoundError, OSError):
            pass

    def write_table(self, name: str, table: pa.Table | Iterable[pa.Table], sort_by: str | None = "id") -> None:
        """Write a table (or an iterable of tables with one schema) as fixed-size shards.

        With ``sort_by`` the whole table is sorted first, which makes shard boundaries and hashes
        independent of how the rows were produced. Pass ``sort_by=None`` for already ordered streams.
        """
        tables = [table] if isinstance(table, pa.Table) else list(table)
        tables = [t for t in tables if t is not None]
        st = self.tables.setdefault(name, _TableState())
        if not tables:
            return
        full = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        if sort_by and sort_by in full.column_names and full.num_rows:
            full = full.sort_by(sort_by)
        if st.schema is None:
            st.schema = full.schema
        for start in range(0, full.num_rows, self.shard_rows):
            self._write_shard(name, st, full.slice(start, self.shard_rows))
        if full.num_rows == 0 and not st.files:
            st.schema = full.schema

    def _write_shard(self, name: str, st: _TableState, chunk: pa.Table) -> None:
        rel = f"{name}/part-{len(st.files):05d}.parquet"
        path = f"{self.tmp}/{rel}"
        self.storage.fs.create_dir(f"{self.tmp}/{name}", recursive=True)
        sink = pa.BufferOutputStream()
        pq.write_table(chunk.cast(st.schema), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        with self.storage.fs.open_output_stream(path) as f:
            f.write(data)
        st.files.append({"path": rel, "rows": chunk.num_rows, "sha256": sha256_bytes(data)})
        st.rows += chunk.num_rows

    def write_file(self, name: str, data: bytes) -> None:
        path = f"{self.tmp}/{name}"
        parent = path.rsplit("/", 1)[0]
        self.storage.fs.create_dir(parent, recursive=True)
        with self.storage.fs.open_output_stream(path) as f:
            f.write(data)
        self.extra_files[name] = sha256_bytes(data)

    def content_hash(self) -> str:
        parts = {n: [f["sha256"] for f in st.files] for n, st in sorted(self.tables.items())}
        return stable_hash({"tables": parts, "files": dict(sorted(self.extra_files.items()))})

    def commit(self, fields: dict) -> dict:
        """Write the manifest (commit marker) and move the output into place. Returns the manifest."""
        tables = {
            name: {
                "rows": st.rows,
                "files": st.files,
                "schema": _schema_b64(st.schema if st.schema is not None else pa.schema([])),
                "columns": [f"{f.name}: {f.type}" for f in (st.schema or pa.schema([]))],
            }
            for name, st in self.tables.items()
        }
        main = tables.get("data") or next(iter(tables.values()), {"rows": 0})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "rows": main["rows"],
            "content_hash": self.content_hash(),
            "tables": tables,
            "files": self.extra_files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
        }
        fs = self.storage.fs
        with fs.open_output_stream(f"{self.tmp}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        final = self.storage.path(self.stage)
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            trash = self.storage.path(f".staging/trash-{self.stage}-{uuid.uuid4().hex[:8]}")
            fs.move(final, trash)  # old output out of the way first; a crash here leaves it in .staging
            fs.move(self.tmp, final)
            fs.delete_dir(trash)
        else:
            fs.move(self.tmp, final)
        self.committed = True
        return manifest
