"""AIP-132 pagination: page sizes and opaque, filter-bound page tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from common.errors import invalid

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class Page:
    """What one List call asks for: how many rows, and after which cursor."""

    size: int
    cursor: dict[str, Any] | None
    fingerprint: str

    def _value(self, key: str) -> Any:
        if self.cursor is None or key not in self.cursor:
            raise invalid("page_token", "is not a token this service issued")
        return self.cursor[key]

    def cursor_int(self, key: str) -> int:
        """An integer of the cursor (a bigint), INVALID_ARGUMENT if the token was forged."""
        value = self._value(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise invalid("page_token", "is not a token this service issued")
        return value

    def cursor_uuid(self, key: str) -> str:
        """A UUID of the cursor."""
        try:
            return str(uuid.UUID(str(self._value(key))))
        except ValueError as exc:
            raise invalid("page_token", "is not a token this service issued") from exc

    def cursor_time(self, key: str) -> datetime:
        """A timestamp of the cursor."""
        try:
            value = datetime.fromisoformat(str(self._value(key)))
        except ValueError as exc:
            raise invalid("page_token", "is not a token this service issued") from exc
        if value.tzinfo is None:
            raise invalid("page_token", "is not a token this service issued")
        return value

    @property
    def fetch_limit(self) -> int:
        """Rows to fetch: one more than the page, to learn whether another page follows."""
        return self.size + 1

    def finish(
        self, rows: Sequence[T], cursor_of: Callable[[T], dict[str, Any]]
    ) -> tuple[list[T], str]:
        """The page's rows (of ``fetch_limit`` fetched) and the next page's token."""
        shown = list(rows[: self.size])
        more = len(rows) > self.size and bool(shown)
        return shown, self.next_token(cursor_of(shown[-1]) if more else None)

    def next_token(self, cursor: dict[str, Any] | None) -> str:
        """The token of the page after the one ending at ``cursor`` ('' when none)."""
        if cursor is None:
            return ""
        raw = json.dumps({"f": self.fingerprint, "c": cursor}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def created_cursor(row: Any) -> dict[str, Any]:
    """The cursor of a row listed in (created_at, id) order."""
    return {"t": row["created_at"].isoformat(), "i": str(row["id"])}


def _fingerprint(filters: dict[str, Any]) -> str:
    raw = json.dumps(filters, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def parse_page(page_size: int, page_token: str, **filters: Any) -> Page:
    """Validate ``page_size``/``page_token``; the token must match the same filters."""
    if page_size < 0:
        raise invalid("page_size", "must not be negative")
    size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    fingerprint = _fingerprint(filters)
    if not page_token:
        return Page(size, None, fingerprint)
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = data["c"]
        token_fingerprint = data["f"]
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid("page_token", "is not a token this service issued") from exc
    if token_fingerprint != fingerprint or not isinstance(cursor, dict):
        raise invalid("page_token", "belongs to a request with different filters")
    return Page(size, cursor, fingerprint)
