"""One writer per run directory: an exclusive lock on ``<run>/.lock``, which holds the writer's pid.

Two ``dharma train -o runs/x`` at once would interleave their metrics and point ``best``
at each other's weights, so the second is refused. The lock is a ``flock`` on the file:
the operating system drops it when its process dies, however it dies, so a lock file
still holding a pid when the lock is free was left by a killed run and is taken over
with a warning. A clean exit removes the file (and the run directory, if the run
created it and wrote nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import DharmaError, first_line

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(root: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of the run directory ``root`` (created if missing) for the block.

    ``enabled`` False (a process other than the main one) takes nothing: only the main process writes.
    """
    if not enabled:
        yield
        return
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DharmaError(f"cannot create the run directory {root}: {first_line(err)}") from None
    fd = _acquire(root / LOCK_FILE)
    try:
        yield
    finally:
        # Unlinked while still held, so a process that opens the name next locks a new file.
        (root / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty: the run failed before writing anything


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise DharmaError(
                f"{path.parent} is in use by another `dharma train` ({holder or 'pid unknown'})",
                hint="Wait for that run to finish, or give this one another --output directory.",
            ) from None
        # The holder may have removed the file between our open and our lock: lock the file
        # that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        left = _read(fd)
        if left:
            warnings.warn(
                f"{path}: taking over the lock of a run that is no longer running ({left})",
                stacklevel=4,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd


def _read(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
