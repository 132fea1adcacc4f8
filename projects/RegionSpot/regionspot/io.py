"""Atomic file writing: results, checkpoints and weights are never left half-written."""

import json
import os
import tempfile
from typing import Any, Callable, IO


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> str:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it to ``path``.

    An interrupted or failing write leaves any previous ``path`` untouched and no temporary
    file behind. Creates the parent folder. Returns ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str, obj: Any) -> str:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2), "w")
