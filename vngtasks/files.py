"""Writing a file so that a reader sees its old content or its new content, whole, never a part; removing
empty directories up a path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it (mode 0600) renamed over it at once; on any
    failure the temporary file is gone and `path` is as it was."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def remove_empty_dirs(here: Path, stop: Path) -> None:
    """`here` and each parent of it below `stop` (not included), while they are empty directories."""
    while here != stop and here.is_relative_to(stop):
        try:
            here.rmdir()
        except OSError:  # not empty, or already gone
            return
        here = here.parent
