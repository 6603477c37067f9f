"""The nightly job's errors and its lock: one run at a time, released by the OS if it dies."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

class NightlyError(RuntimeError):
    pass


class LockHeld(NightlyError):
    pass


class RunLock:
    """An exclusive, non-blocking flock; released by the OS if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.fh.close()
            raise LockHeld(f"{self.path}: another nightly run holds the lock") from exc
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
        finally:
            self.fh.close()  # closing releases the lock too, whatever happened above
