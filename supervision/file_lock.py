"""An exclusive, non-blocking lock on a file, held for the life of a process.

``flock`` locks belong to the open file: the kernel drops them when the holder exits,
however it exits, so a crash never leaves a stale lock behind. The holder writes its pid
into the file so that a refused caller can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another process (or another open of the same file) holds the lock."""

    def __init__(self, path: Path, holder_pid: int | None) -> None:
        holder = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder_pid = holder_pid


@dataclass
class FileLock:
    """A held lock; ``release()`` it, or let the process exit."""

    path: Path
    _fd: int

    @classmethod
    def acquire(cls, path: Path) -> FileLock:
        """Take the lock on ``path`` (created if missing) or raise ``LockHeldError``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Python opens files non-inheritable, so child processes never hold the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(path, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Drop the lock; calling it again does nothing."""
        if self._fd >= 0:
            # The file stays: unlinking a lock file lets two processes lock two inodes.
            os.close(self._fd)
            self._fd = -1


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
