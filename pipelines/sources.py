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


def _sample_folder(storage, n: int, resolution: int, seed: int) -> str:
    # the sample is a local folder: under a local storage root, else in ./.sslforge (remote roots are read
    # by path through pyarrow, a generated sample does not need to live there)
    base = storage.root if storage.is_local else os.path.abspath(".sslforge")
    return os.path.join(base, ".builtin", f"shapes-{n}-{resolution}-{seed}")


def materialize_builtin(storage, n: int, resolution: int, seed: int = 0) -> str:
    """Write the procedural sample (idempotent) and return its image folder."""
    from tasks.data.sample import write_sample

    folder = _sample_folder(storage, n, resolution, seed)
    write_sample(folder, n=n, resolution=resolution, seed=seed)
    return os.path.join(folder, "images")


def builtin_masks_folder(storage, n: int, resolution: int, seed: int = 0) -> str:
    return os.path.join(_sample_folder(storage, n, resolution, seed), "masks")
