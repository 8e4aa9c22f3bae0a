"""What a command prints: Rich tables for people, JSON for scripts (``--json``).

Messages print generically from their descriptors: an enum value loses its type prefix
(``ISSUE_STATUS_IN_PROGRESS`` -> ``in_progress``), a timestamp reads as UTC, and
``--json`` is ``MessageToDict`` with the proto field names (as grpcurl prints them): one
object for a resource, an array for a list. Errors and progress go to stderr, so stdout
holds only the result.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

from paperclip_cli.deferred import json_format, rich_box, rich_console, rich_table

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from rich.console import Console

#: A table column: its header and the field name, or a function of the message.
Column = tuple[str, "str | Callable[[Any], str]"]

#: Wide enough that UUID columns never wrap when stdout is a pipe or a file.
PIPE_WIDTH = 400


def enum_prefix(enum_name: str) -> str:
    """``IssueStatus`` -> ``ISSUE_STATUS_``: the prefix the API puts on its values."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


def short_enum(enum_name: str, value_name: str) -> str:
    """A value without its type prefix, lower-cased: ``in_progress``."""
    prefix = enum_prefix(enum_name)
    short = value_name.removeprefix(prefix)
    return "-" if short == "UNSPECIFIED" else short.lower()


def format_field(message: Message, name: str) -> str:
    """One field of ``message`` as a table cell."""
    field = message.DESCRIPTOR.fields_by_name[name]
    value = getattr(message, name)
    if field.is_repeated:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
        if field.message_type is not None:
            return f"{len(value)} item(s)" if value else ""
        return ", ".join(_scalar(field, item) for item in value)
    if field.message_type is not None and not message.HasField(name):
        return ""
    if field.has_presence and field.message_type is None and not message.HasField(name):
        return ""
    return _scalar(field, value)


def _scalar(field: Any, value: Any) -> str:
    if field.enum_type is not None:
        return short_enum(field.enum_type.name, field.enum_type.values_by_number[value].name)
    if field.message_type is not None:
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return str(value.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ"))
        return json.dumps(to_dict(value), separators=(",", ":"))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def to_dict(message: Message) -> dict[str, Any]:
    """``message`` as JSON-ready data with proto field names."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


class Output:
    """Where a command's results and messages go, in the chosen format."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The Rich console on stdout (made on first use: Rich is imported only then)."""
        if self._console is None:
            width = None if sys.stdout.isatty() else PIPE_WIDTH
            self._console = rich_console.Console(
                width=width, markup=False, highlight=False, emoji=False
            )
        return self._console

    def data(self, value: Any) -> None:
        """JSON data on stdout, one document."""
        sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()

    def resource(self, message: Message, *, title: str = "") -> None:
        """One resource: every set field, one per row; or its JSON object."""
        if self.as_json:
            self.data(to_dict(message))
            return
        self.fields(
            [(f.name, format_field(message, f.name)) for f in message.DESCRIPTOR.fields],
            title=title,
        )

    def fields(self, pairs: Iterable[tuple[str, str]], *, title: str = "") -> None:
        """Label/value rows for people (empty values left out)."""
        table = rich_table.Table(
            show_header=False, box=None, title=title or None, title_justify="left"
        )
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in pairs:
            if value not in ("", "-"):
                table.add_row(label, value)
        self.console.print(table)

    def listing(
        self, messages: Sequence[Message], columns: Sequence[Column], *, empty: str
    ) -> None:
        """Several resources: a table of ``columns``; or a JSON array of the messages."""
        if self.as_json:
            self.data([to_dict(m) for m in messages])
            return
        if not messages:
            self.note(empty)
            return
        self.table([header for header, _ in columns], [_row(m, columns) for m in messages])

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[str]], title: str = "") -> None:
        """A table of plain strings for people."""
        table = rich_table.Table(
            box=rich_box.SIMPLE, title=title or None, title_justify="left", pad_edge=False
        )
        for header in headers:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def line(self, text: str) -> None:
        """One plain line on stdout, for people."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        """A message for people on stderr (never mixed into the results)."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _row(message: Message, columns: Sequence[Column]) -> list[str]:
    return [spec(message) if callable(spec) else format_field(message, spec) for _, spec in columns]


__all__ = [
    "PIPE_WIDTH",
    "Column",
    "Output",
    "enum_prefix",
    "format_field",
    "short_enum",
    "to_dict",
]
