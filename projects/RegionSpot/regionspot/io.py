"""Atomic file writing: results, checkpoints and weights are never left half-written; JSON is
written strictly (RFC 8259: no bare ``NaN`` / ``Infinity``, which strict parsers reject)."""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Optional


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (the token cache's shards, the exported
    head's checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class DiskFullError(OSError):
    """A file could not be written for lack of space; the message names the folder, the bytes
    needed and the bytes free (a plain ``OSError`` subclass, so callers that report ``OSError``
    show it as one line)."""


#: errno values that mean "no room": the device is full, or the user's quota is.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(folder: str) -> int:
    """Bytes free for this user in the file system of ``folder`` (``shutil.disk_usage``)."""
    return shutil.disk_usage(folder).free


def check_free_space(folder: str, needed: int, name: str = "") -> None:
    """Raise :class:`DiskFullError` when ``folder``'s file system has less than ``needed`` bytes
    free (before a write whose size is known, so that nothing is started that cannot finish).

    Args:
        folder: where the file goes (must exist).
        needed: the file's size in bytes.
        name: the file's name, for the message.
    """
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"no space left in {folder} for {name or 'a file'}: it needs {needed} bytes, "
                            f"{free} bytes are free; free some space (or choose another folder), then resume")


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb", size: Optional[int] = None) -> str:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it to ``path``.

    An interrupted or failing write leaves any previous ``path`` untouched and no temporary
    file behind. Creates the parent folder. Returns ``path``.

    Args:
        size: the bytes ``write`` will write, when known: checked against the free space first.

    Raises:
        DiskFullError: the file system has no room for the file (checked before with ``size``,
            or the write failed with ENOSPC / EDQUOT): the message names the folder, the bytes
            needed (at least those written when the disk filled) and the bytes free.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    if size is not None:
        check_free_space(directory, size, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # a full disk shows here at the latest, not after the rename
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            needed = f"{size} bytes" if size is not None else f"more than the {written} bytes written"
            raise DiskFullError(f"no space left in {directory} for {name}: it needs {needed}, "
                                f"{free_bytes(directory)} bytes are free; free some space (or choose another "
                                f"folder), then resume") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically after checking the free space (see
    :func:`atomic_write`; raises :class:`DiskFullError`). Returns ``path``."""
    return atomic_write(path, lambda f: f.write(data), "wb", size=len(data))


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every float that is NaN or infinite replaced by None (JSON ``null``).

    Python's ``json`` writes such floats as bare ``NaN`` / ``Infinity`` / ``-Infinity``, which
    are not JSON (strict parsers, ``jq``, JavaScript's ``JSON.parse`` reject the file). Dicts,
    lists and tuples are walked (a tuple becomes a list, as ``json`` writes it); numpy scalars
    and 0-d arrays become Python numbers; everything else is returned as it is. ``obj`` is not
    modified.
    """
    if isinstance(obj, float):  # also numpy.float64, a float subclass
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return strict_json_value(obj.item())  # numpy.float32, numpy.int64, 0-d arrays
    return obj


def dumps_strict_json(obj: Any, **kwargs) -> str:
    """``json.dumps(obj, **kwargs)`` as strict JSON: NaN and infinite floats written as ``null``
    (see :func:`strict_json_value`).

    The common case (no such float) costs one ``json.dumps`` with ``allow_nan=False`` (C
    encoder, no copy of ``obj``); only when that refuses a value is ``obj`` cleaned and dumped
    again.

    Raises:
        TypeError: a value ``json`` cannot serialise (as ``json.dumps``).
    """
    kwargs.pop("allow_nan", None)
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:  # "Out of range float values are not JSON compliant"
        return json.dumps(strict_json_value(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj: Any, indent: Any = 2, **kwargs) -> str:
    """Write ``obj`` as strict JSON (indented by ``indent``; NaN and infinite floats as
    ``null``, see :func:`dumps_strict_json`) to ``path`` atomically (see :func:`atomic_write`).
    ``kwargs`` go to ``json.dumps`` (e.g. ``separators``). Returns ``path``.

    Raises:
        TypeError: a value ``json`` cannot serialise; nothing is written then.
        OSError: the file cannot be written (any previous ``path`` is kept);
            :class:`DiskFullError` when there is no room for it.
    """
    data = dumps_strict_json(obj, indent=indent, **kwargs).encode("utf-8")  # before the file is opened
    return atomic_write_bytes(path, data)


class AtomicFile:
    """A file opened for writing that reaches ``path`` only when closed without an error: the
    content is kept in memory, then written by :func:`atomic_write_bytes` (free space checked,
    :class:`DiskFullError` when there is none). For writers that open their own files
    (Detectron2's evaluators, ``torch.save``), see :func:`atomic_opens`.

    Args:
        path: the final file.
        mode: "w" (text, UTF-8) or "wb".
    """

    def __init__(self, path: str, mode: str = "wb"):
        self.path = path
        self.buffer = io.StringIO() if "b" not in mode else io.BytesIO()
        self.closed = False

    def write(self, data):
        return self.buffer.write(data)

    def __getattr__(self, name):  # seek, tell, flush, writelines ... of the buffer
        return getattr(self.buffer, name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            data = self.buffer.getvalue()
            atomic_write_bytes(self.path, data.encode("utf-8") if isinstance(data, str) else data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.closed = True  # an interrupted write: nothing reaches ``path``


@contextlib.contextmanager
def atomic_opens(manager: Any, folder: str):
    """Within the block, ``manager.open(path, "w"/"wb")`` of a path under ``folder`` returns an
    :class:`AtomicFile`: files that a library writes in place (Detectron2's evaluators write
    ``instances_predictions.pth`` and ``lvis_instances_results.json`` through iopath's
    ``PathManager``) are written atomically, and a full disk is a :class:`DiskFullError`.

    Args:
        manager: an object with an ``open(path, mode, ...)`` method (iopath's ``PathManager``).
        folder: the folder whose files are written atomically ("" or None: none).
    """
    if not folder:
        yield
        return
    root = os.path.abspath(folder) + os.sep
    original = manager.open
    own = "open" in vars(manager)

    def open_(path, mode="r", *args, **kwargs):
        if isinstance(path, str) and mode in ("w", "wb") and os.path.abspath(path).startswith(root):
            return AtomicFile(path, mode)
        return original(path, mode, *args, **kwargs)

    manager.open = open_
    try:
        yield
    finally:
        if own:
            manager.open = original
        else:
            del manager.open  # the class's method again


class SpaceCheckedStream:
    """A writable text stream whose every ``write`` first checks that its folder has room for
    the text (:func:`check_free_space`), so an append-only log (Detectron2's ``metrics.json``)
    stops with a :class:`DiskFullError` before a partial line is written, not in the middle of one.
    Everything else is the wrapped stream's."""

    def __init__(self, stream: IO, path: str):
        self._stream = stream
        self._folder = os.path.dirname(os.path.abspath(path))
        self._name = os.path.basename(path)

    def write(self, text: str) -> int:
        check_free_space(self._folder, len(text.encode("utf-8")) + 4096, self._name)  # + a page for the file system
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)
