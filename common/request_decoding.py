"""Decoding of request messages, so that no request answers UNKNOWN.

A deserializer that raises makes grpc.aio answer UNKNOWN (with the exception's class in
the message) before any interceptor runs. The server therefore decodes with
``tolerant``: bytes that do not decode become an ``Undecodable`` request, refused as
INVALID_ARGUMENT after the caller is authenticated, naming the field that could not be
decoded when the wire format lets it be found (``request`` otherwise).

Free-form JSON (``Struct``, ``Value``, ``ListValue``) may nest at most
``MAX_STRUCT_DEPTH`` levels: well under protobuf's own limit of 100 nested messages
(about 33 levels of ``Struct``), so every response that carries it back, a message or
two deeper, still decodes. Its numbers must be finite: JSON has no NaN or Infinity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from common.errors import InvalidArgument, invalid

#: Levels of nested objects and lists a ``Struct`` or ``Value`` may have (``{}`` is one).
MAX_STRUCT_DEPTH = 32
#: The field named when the bytes cannot be blamed on one field.
REQUEST_FIELD = "request"

_STRUCT = "google.protobuf.Struct"
_LIST = "google.protobuf.ListValue"
_VALUE = "google.protobuf.Value"
_JSON_TYPES = frozenset({_STRUCT, _LIST, _VALUE})
_TOO_DEEP = f"must be nested at most {MAX_STRUCT_DEPTH} levels deep"
_NOT_FINITE = "must hold finite numbers only (JSON has no NaN or Infinity)"


class Undecodable:
    """A request whose bytes did not decode as its method's input message."""

    def __init__(self, method: str, data: bytes) -> None:
        self.method = method
        self.data = data

    def error(self) -> InvalidArgument:
        """INVALID_ARGUMENT naming the field the bytes fail on, else ``request``."""
        descriptor = _input_type(self.method)
        if descriptor is None:
            return invalid(REQUEST_FIELD, "cannot be decoded")
        field, description = _blame(descriptor, self.data, "")
        return invalid(field or REQUEST_FIELD, description)


def tolerant(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """``deserializer``, returning an ``Undecodable`` instead of raising."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any failure to decode is the request's fault
            return Undecodable(method, data)

    return deserialize


def check_request(request: Any) -> None:
    """Refuse an undecodable request, or free-form JSON nested too deeply or holding
    NaN or Infinity, as INVALID_ARGUMENT naming the field."""
    if isinstance(request, Undecodable):
        raise request.error()
    if isinstance(request, Message):
        found = bad_json(request)
        if found is not None:
            raise invalid(*found)


def bad_json(message: Message, path: str = "") -> tuple[str, str] | None:
    """The path of the first JSON field of ``message`` that is not acceptable, and why."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name in _JSON_TYPES:
        problem = json_problem(message)
        return None if problem is None else (path or REQUEST_FIELD, problem)
    for field in _json_fields(descriptor):
        name = f"{path}.{field.name}" if path else field.name
        for child_path, child in _children(message, field, name):
            found = bad_json(child, child_path)
            if found is not None:
                return found
    return None


def json_problem(value: Message) -> str | None:
    """Why a ``Struct``, ``ListValue`` or ``Value`` is not acceptable JSON (nested
    more than ``MAX_STRUCT_DEPTH`` levels of objects and lists, or a number that is
    not finite), or None. Iterative: no Python recursion for deep input."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = item.DESCRIPTOR.full_name
        children: Any = ()
        if kind == _STRUCT:
            depth += 1
            children = item.fields.values()
        elif kind == _LIST:
            depth += 1
            children = item.values
        else:
            which = item.WhichOneof("kind")
            if which == "struct_value":
                children = (item.struct_value,)
            elif which == "list_value":
                children = (item.list_value,)
            elif which == "number_value" and not math.isfinite(item.number_value):
                return _NOT_FINITE
        if depth > MAX_STRUCT_DEPTH:
            return _TOO_DEEP
        stack.extend((child, depth) for child in children)
    return None


def _children(message: Message, field: FieldDescriptor, name: str) -> Iterator[tuple[str, Any]]:
    """The set sub-messages of one message field (repeated and map fields included)."""
    value: Any = getattr(message, field.name)
    if _is_map(field):
        for key, item in value.items():
            yield f"{name}[{key}]", item
    elif field.is_repeated:
        for index, item in enumerate(value):
            yield f"{name}[{index}]", item
    elif message.HasField(field.name):
        yield name, value


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _message_value(field: FieldDescriptor) -> Descriptor | None:
    """The message type a field holds (a map's value type), if any."""
    if field.message_type is None:
        return None
    if _is_map(field):
        return field.message_type.fields_by_name["value"].message_type
    return field.message_type


@functools.cache
def _json_fields(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The fields of ``descriptor`` through which free-form JSON can be reached."""
    return tuple(
        field
        for field in descriptor.fields
        if (held := _message_value(field)) is not None and _reaches_json(held, frozenset())
    )


def _reaches_json(descriptor: Descriptor, seen: frozenset[str]) -> bool:
    if descriptor.full_name in _JSON_TYPES:
        return True
    if descriptor.full_name in seen:
        return False
    seen = seen | {descriptor.full_name}
    return any(
        (held := _message_value(field)) is not None and _reaches_json(held, seen)
        for field in descriptor.fields
    )


@functools.cache
def _input_type(method: str) -> Descriptor | None:
    """The input message of ``/package.Service/Method``, if the method is known."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return found.input_type


def _blame(descriptor: Descriptor, data: bytes, path: str) -> tuple[str, str]:
    """The deepest field of a ``descriptor`` message that ``data`` fails on, and why;
    ``path`` itself when no one field is to blame."""
    generic = f"is not a valid {descriptor.full_name} message"
    fields = _wire_fields(data)
    if fields is None:
        return path, generic
    for number, chunk in fields:
        field = descriptor.fields_by_number.get(number)
        if field is None or chunk is None:
            continue
        name = f"{path}.{field.name}" if path else field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name, "must be valid UTF-8"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _blame_message(field, chunk, name)
            if found is not None:
                return found
    return path, generic


def _blame_message(field: FieldDescriptor, chunk: bytes, name: str) -> tuple[str, str] | None:
    descriptor = field.message_type
    assert descriptor is not None
    cls = message_factory.GetMessageClass(descriptor)
    try:
        decoded = cls.FromString(chunk)
    except DecodeError as exc:
        if descriptor.full_name in _JSON_TYPES or _is_map(field):
            too_nested = "depth" in str(exc).lower()
            return name, _TOO_DEEP if too_nested else f"is not a valid {descriptor.full_name}"
        return _blame(descriptor, chunk, name)
    # Decodes alone yet not where it is: nested too deeply with its parents.
    return bad_json(decoded, name)


def _wire_fields(data: bytes) -> list[tuple[int, bytes | None]] | None:
    """The top-level fields of an encoded message as (number, bytes of a
    length-delimited field or None); None when the framing itself is corrupt."""
    fields: list[tuple[int, bytes | None]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key is None:
            return None
        number, wire_type = key >> 3, key & 7
        chunk: bytes | None = None
        if wire_type == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return None
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if length is None:
                return None
            chunk = data[pos : pos + length]
            pos += length
        else:
            return None
        if pos > len(data):
            return None
        fields.append((number, chunk))
    return fields


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            return None, pos
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    return None, pos
