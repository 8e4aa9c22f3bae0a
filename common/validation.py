"""Request field validation: every malformed field becomes INVALID_ARGUMENT naming it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from google.protobuf import timestamp_pb2

from common.errors import FieldViolation, InvalidArgument, invalid

E = TypeVar("E", bound=int)

MAX_NAME = 200
MAX_TITLE = 500
MAX_BODY = 100_000


class Violations:
    """Collects every bad field of a request, so the client learns them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.items)
            raise InvalidArgument(summary, violations=self.items)


def parse_uuid(field: str, value: str, *, required: bool = True) -> str | None:
    """The canonical form of a UUID string; '' is None unless ``required``."""
    if value == "":
        if required:
            raise invalid(field, "is required")
        return None
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError) as exc:
        raise invalid(field, f"must be a UUID, got {value[:64]!r}") from exc


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID."""
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError):
        return False
    return True


def collect_uuid(v: Violations, field: str, value: str, *, required: bool = True) -> str | None:
    """The canonical form of a UUID field, or None with its problem added to ``v``
    (None too for '' when not ``required``): for requests whose bad fields are all named
    at once."""
    if value == "":
        if required:
            v.add(field, "is required")
        return None
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError):
        v.add(field, f"must be a UUID, got {value[:64]!r}")
        return None


def parse_uuids(field: str, values: Iterable[str], *, limit: int = 100) -> list[str]:
    """A de-duplicated list of UUIDs, in order."""
    out: list[str] = []
    for index, value in enumerate(values):
        parsed = parse_uuid(f"{field}[{index}]", value)
        if parsed is not None and parsed not in out:
            out.append(parsed)
    if len(out) > limit:
        raise invalid(field, f"at most {limit} entries")
    return out


def require_text(field: str, value: str, *, max_length: int, required: bool = True) -> str:
    """A stripped string within ``max_length`` characters, non-empty when ``required``."""
    stripped = value.strip()
    if required and not stripped:
        raise invalid(field, "is required")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise invalid(field, "must not contain NUL characters")
    return stripped


def require_enum(field: str, value: E, known: Sequence[int], *, required: bool = True) -> E | None:
    """A known, non-zero enum value (zero is None unless ``required``)."""
    if value == 0:
        if required:
            raise invalid(field, "is required")
        return None
    if value not in known:
        raise invalid(field, f"unknown value {value}")
    return value


def check_timestamp(v: Violations, field: str, value: timestamp_pb2.Timestamp) -> datetime | None:
    """The (naive, UTC) datetime of a Timestamp, or None with a violation when it is
    outside what a Timestamp may hold (years 1 to 9999, nanos 0 to 999,999,999)."""
    try:
        return value.ToDatetime()
    except (ValueError, OverflowError):
        v.add(field, "must be a time between 0001-01-01 and 9999-12-31 (nanos 0 to 999999999)")
        return None
