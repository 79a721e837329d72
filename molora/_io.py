"""Writing a file so that readers see the old one or the complete new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file in ``path``'s folder, then move it onto ``path``.

    An interrupted or failed write leaves ``path`` as it was (and no temporary file behind).
    """
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        # mkstemp creates the file readable by its owner only: give it the mode of the file it replaces, or the
        # umask's default as a plain open() would
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_files(source: Path, target: Path, last: tuple[str, ...] = ()) -> None:
    """Move every file under the folder ``source`` to the same place under ``target`` (replacing what is there, one
    ``os.replace`` per file: a reader never sees a file half-written), files named in ``last`` after the others.

    With ``source`` written completely first, ``target`` holds its earlier files or the new ones, file by file; the
    files ``target`` has and ``source`` has not are left."""
    files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
    for path in files:
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
