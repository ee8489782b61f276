"""List image files under a local folder and read them without ever raising.

``list_images`` selects entries by extension (SUPPORTED_EXTENSIONS, case-insensitive), skips hidden
entries (name starting with "."), and reports entries that carry an image extension but cannot be read
as a file, so that every candidate is accounted for:

``not_a_file: ...``   a directory, FIFO, socket, device or broken symlink named like an image
                       (a directory named ``x.jpg`` is reported *and* still descended into)
``unreadable: ...``   stat/permission failure (as root, chmod 000 files stay readable and are listed)

Symlinks to files are followed; symlinks to directories are not descended into (no cycles).
"""
from __future__ import annotations

import os
import stat

from .decode import has_image_extension

NOT_A_FILE = "not_a_file"
UNREADABLE = "unreadable"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (sorted image file paths, sorted [(path, reason)] for image-named entries we cannot read).

    ``root`` may also be a single image file. Raises FileNotFoundError / NotADirectoryError only for a
    bad ``root`` itself (a configuration error); nothing below it makes this function raise.
    """
    root = os.fspath(root)
    if os.path.isfile(root):
        if has_image_extension(os.path.basename(root)):
            files, problems = _classify(root)
            return files, problems
        raise NotADirectoryError(f"{root}: not a folder and not an image file")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")

    files: list[str] = []
    problems: list[tuple[str, str]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if folder == root:
                raise
            problems.append((folder, f"{UNREADABLE}: cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(entry.path)
            if has_image_extension(entry.name):
                f, p = _classify(entry.path)
                files.extend(f)
                problems.extend(p)
    files.sort()
    problems.sort()
    return files, problems


def _classify(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            return [], [(path, f"{NOT_A_FILE}: broken symlink")]
        return [], [(path, f"{UNREADABLE}: vanished while listing")]
    except OSError as exc:
        return [], [(path, f"{UNREADABLE}: {exc.strerror or exc}")]
    if stat.S_ISDIR(st.st_mode):
        return [], [(path, f"{NOT_A_FILE}: is a directory")]
    if not stat.S_ISREG(st.st_mode):
        return [], [(path, f"{NOT_A_FILE}: not a regular file")]
    if not os.access(path, os.R_OK):
        return [], [(path, f"{UNREADABLE}: permission denied")]
    return [path], []


def read_bytes(path: str, max_bytes: int | None = None) -> tuple[bytes | None, str]:
    """Read a whole file. Never raises: returns (data, "") or (None, "<code>: <detail>").

    Codes: ``not_a_file`` (directory / special file), ``unreadable`` (any OS error), ``too_large``
    (file bigger than ``max_bytes`` when given).
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return None, f"{NOT_A_FILE}: is a directory"
        if not stat.S_ISREG(st.st_mode):
            return None, f"{NOT_A_FILE}: not a regular file"
        if max_bytes is not None and st.st_size > max_bytes:
            return None, f"too_large: file is {st.st_size} bytes > {max_bytes}"
        with open(path, "rb") as fh:
            return fh.read(), ""
    except OSError as exc:
        return None, f"{UNREADABLE}: {exc.strerror or type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - never raise
        return None, f"{UNREADABLE}: {type(exc).__name__}: {exc}"
