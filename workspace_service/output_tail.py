"""The kept part of one output stream: its last bytes, its size and its digest.

Memory stays flat however much a command writes: only the tail (256 KiB by default)
is held, while the byte count and SHA-256 cover the whole stream.
"""

from __future__ import annotations

import hashlib

#: Bytes of each stream kept.
TAIL_BYTES = 256 * 1024
#: Characters of each stream shown as an excerpt.
EXCERPT_CHARS = 4096


class OutputTail:
    """Append-only stream that keeps its last ``limit`` bytes."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.total = 0
        self._buffer = bytearray()
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        self._digest.update(data)
        if len(data) >= self.limit:
            self._buffer[:] = data[-self.limit :]
            return
        self._buffer += data
        overflow = len(self._buffer) - self.limit
        if overflow > 0:
            del self._buffer[:overflow]

    def write_text(self, line: str) -> None:
        self.write(line.encode() if line.endswith("\n") else (line + "\n").encode())

    @property
    def truncated(self) -> bool:
        return self.total > len(self._buffer)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest() if self.total else ""

    def text(self) -> str:
        """The kept bytes as text, after a truncation marker when bytes were dropped."""
        kept = _clean(bytes(self._buffer).decode("utf-8", errors="replace"))
        if not self.truncated:
            return kept
        return (
            f"[output truncated to last {len(self._buffer)} bytes; total {self.total} bytes]\n"
            + kept
        )

    def excerpt(self) -> str:
        """The last ``EXCERPT_CHARS`` characters of the stream."""
        tail = bytes(self._buffer[-EXCERPT_CHARS * 4 :]).decode("utf-8", errors="replace")
        return _clean(tail[-EXCERPT_CHARS:])


def _clean(value: str) -> str:
    # PostgreSQL text cannot hold NUL.
    return value.replace("\x00", "\ufffd")
