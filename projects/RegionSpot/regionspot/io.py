"""Atomic file writing: results, checkpoints and weights are never left half-written; JSON is
written strictly (RFC 8259: no bare ``NaN`` / ``Infinity``, which strict parsers reject)."""

import json
import math
import os
import tempfile
from typing import IO, Any, Callable


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
        OSError: the file cannot be written (any previous ``path`` is kept).
    """
    text = dumps_strict_json(obj, indent=indent, **kwargs)  # before the file is opened
    return atomic_write(path, lambda f: f.write(text), "w")
