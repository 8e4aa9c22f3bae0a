"""Conversions between database values and protobuf well-known types."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A ``Timestamp`` for an aware datetime, or None (the field stays unset)."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(value: Mapping[str, Any] | str | None) -> struct_pb2.Struct:
    """A ``Struct`` from a JSON object (a dict, or its text as asyncpg may return it)."""
    out = struct_pb2.Struct()
    if value is None:
        return out
    data = json.loads(value) if isinstance(value, str) else value
    out.update(dict(data))
    return out


def text(value: object | None) -> str:
    """A proto string field for a nullable column (UUIDs included): '' when null."""
    return "" if value is None else str(value)


def text_or_none(value: object | None) -> str | None:
    """A nullable column (UUIDs included) as text: None stays None."""
    return None if value is None else str(value)
