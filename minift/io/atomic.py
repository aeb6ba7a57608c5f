"""Atomic writes: a file, or a whole folder, is either the old one or the new one, never a mix.

A file is written to a temporary name beside it, flushed to disk (``fsync``) and renamed over the
target (``os.replace`` is atomic on POSIX and Windows); on any failure the temporary is removed and
the target is untouched.

A folder (a model, a PEFT or S2FT adapter) is several files that only make sense together: a new
``adapter_model.safetensors`` beside an old ``adapter_config.json`` loads without error and computes
nonsense. ``replace_folder`` therefore builds the new folder under a temporary sibling name and swaps
it in whole. A directory cannot replace a non-empty one in one rename, so the old folder is first
renamed aside and removed after the new one is in place; between those two renames the old folder
sits complete under its temporary name. Files of the old folder the new one does not write (notes,
a tokenizer, an adapter saved inside a model folder) are copied along, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def write_file_atomic(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (bytes, or a function that writes into a binary file object) to ``path``
    atomically: temporary file, flush, fsync, rename; on failure ``path`` is unchanged and the
    temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write failed


@contextlib.contextmanager
def replace_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with replace_folder(folder) as tmp:`` write the new folder's files into ``tmp``; when the block
    ends without an exception, ``tmp`` replaces ``folder`` whole (other files of an existing
    ``folder`` are kept). When it raises, ``tmp`` is removed and ``folder`` is exactly as before."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def swap_in(new: Path, folder: Path) -> None:
    """Put the complete folder ``new`` at ``folder``, replacing an existing one whole (its files that
    ``new`` lacks are copied over first, so the old folder stays intact until the swap)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    for f in folder.iterdir():
        if not (new / f.name).exists():
            if f.is_dir() and not f.is_symlink():
                shutil.copytree(f, new / f.name, symlinks=True)
            else:
                shutil.copy2(f, new / f.name, follow_symlinks=False)
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.rename(folder, old / folder.name)
    try:
        os.rename(new, folder)  # between these two renames the previous folder sits whole in `old`
    except BaseException:
        os.rename(old / folder.name, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
