"""One job per output folder: a lock file that a second job on the same folder is refused by.

The job's first process (global rank 0) holds an exclusive ``flock`` on
``<OUTPUT_DIR>/.regionspot.lock`` for as long as it lives and writes its host, pid and start
time into it. The kernel releases the lock when the process ends, however it ends (``kill -9``
included), so a crashed job never leaves a stale lock and an elastic restart of the same job
takes it again. A second job on the folder is refused with one line naming the holder.
(``flock`` is advisory and local to one machine's kernel or to a file system that supports it.)
"""

import datetime
import fcntl
import os
import socket

LOCK_NAME = ".regionspot.lock"
_held = {}  # real folder path -> open lock file of this process


class OutputDirInUse(ValueError):
    """Another running job holds the output folder (the message names its host and pid)."""


def lock_output_dir(folder: str, key: str = "OUTPUT_DIR") -> str:
    """Take ``<folder>/.regionspot.lock`` for this process (again: a no-op); returns its path.

    Args:
        folder: the job's output folder (created if missing).
        key: how the folder is named in the error (the config key or the option).

    Raises:
        OutputDirInUse: another process holds the folder.
    """
    real = os.path.realpath(folder)
    path = os.path.join(real, LOCK_NAME)
    if real in _held:
        return path
    os.makedirs(real, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputDirInUse(f"{key} {folder!r} is in use by a running job ({holder}; lock file {path}): wait for "
                             f"it to end or choose another {key}") from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n")
    f.flush()
    _held[real] = f
    return path


def release_output_dir(folder: str) -> None:
    """Release this process's lock on ``folder`` (the file stays; it is not an output)."""
    f = _held.pop(os.path.realpath(folder), None)
    if f is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
