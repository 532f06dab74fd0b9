"""Writing a file so that a reader sees its old content or its new content, whole, never a part."""

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
