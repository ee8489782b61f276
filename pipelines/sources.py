"""Where the curate stage's input comes from: a folder, a Parquet path, a URI, or the built-in sample."""
from __future__ import annotations

import os

from tasks.config import ConfigError

BUILTIN = "builtin://"


def is_builtin(uri: str) -> bool:
    return uri.startswith(BUILTIN)


def check_input(uri: str) -> None:
    """Fail early (exit 2) on a local input path that does not exist."""
    if is_builtin(uri):
        if uri[len(BUILTIN):] != "shapes":
            raise ConfigError(f"curate.input: unknown built-in sample {uri!r} (known: builtin://shapes)")
        return
    if "://" in uri and not uri.startswith("file://"):
        return  # remote: checked by the filesystem when read
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.exists(path):
        raise ConfigError(f"curate.input: {uri!r} does not exist")


def materialize_builtin(uri: str, storage_root: str, n: int, resolution: int, seed: int = 0) -> str:
    """Write the procedural sample under the storage root (idempotent) and return its image folder."""
    from tasks.data.sample import write_sample

    folder = os.path.join(storage_root, ".builtin", f"shapes-{n}-{resolution}-{seed}")
    write_sample(folder, n=n, resolution=resolution, seed=seed)
    return folder


def builtin_masks_folder(storage_root: str, n: int, resolution: int, seed: int = 0) -> str:
    return os.path.join(storage_root, ".builtin", f"shapes-{n}-{resolution}-{seed}", "masks")
