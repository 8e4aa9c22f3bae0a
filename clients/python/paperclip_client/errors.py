"""One exception tree for the whole suite and its clients, mapped to ``google.rpc.Status``
both ways.

Domain code raises these deep inside; the server interceptor turns them into a gRPC
status with exactly one ``ErrorInfo`` (domain ``paperclip``) plus ``BadRequest`` field
violations where they apply. Clients turn the status back into the same classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "paperclip"


class ConfigError(ValueError):
    """A configuration value (an address, a token, a setting) that cannot be used."""


@dataclass(frozen=True)
class FieldViolation:
    """One malformed request field."""

    field: str
    description: str


class PaperclipError(Exception):
    """Base of every error a client may see; ``reason`` is what clients branch on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


class InvalidArgument(PaperclipError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class Unauthenticated(PaperclipError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(PaperclipError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(PaperclipError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PaperclipError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(PaperclipError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(PaperclipError):
    code = grpc.StatusCode.ABORTED
    default_reason = "CONCURRENT_MODIFICATION"


class Unavailable(PaperclipError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Internal(PaperclipError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[PaperclipError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        Internal,
    )
}


def invalid(field: str, description: str) -> InvalidArgument:
    """An INVALID_ARGUMENT error for one field."""
    return InvalidArgument(
        f"{field}: {description}", violations=[FieldViolation(field, description)]
    )


def to_status_proto(error: PaperclipError) -> status_pb2.Status:
    """The ``google.rpc.Status`` carrying ``error`` with its details."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)
    for key, value in error.metadata.items():
        info.metadata[key] = value
    detail = any_pb2.Any()
    detail.Pack(info)
    status.details.append(detail)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        extra = any_pb2.Any()
        extra.Pack(bad)
        status.details.append(extra)
    return status


def from_status_proto(status: status_pb2.Status) -> PaperclipError:
    """Rebuild the exception a server raised from its ``google.rpc.Status``."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), None)
    cls = _BY_CODE.get(code, PaperclipError) if code is not None else PaperclipError
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
            metadata = dict(info.metadata)
        elif detail.Unpack(bad):
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    error = cls(status.message, reason=reason, metadata=metadata, violations=violations)
    if cls is PaperclipError and code is not None:
        error.code = code
    return error


STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class WireStatus(grpc.Status):
    """A status as the server sends it: code, message, and the encoded details."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def to_wire_status(
    error: PaperclipError, extra_metadata: tuple[tuple[str, str], ...] = ()
) -> WireStatus:
    """The status that carries ``error`` (with its ``google.rpc.Status``) to the client."""
    status = to_status_proto(error)
    return WireStatus(
        error.code,
        error.message,
        ((STATUS_DETAILS_KEY, status.SerializeToString()), *extra_metadata),
    )


def from_rpc_error(error: grpc.RpcError) -> PaperclipError:
    """Turn a failed call (sync or aio) back into the project's exception type."""
    call: Any = error
    code: grpc.StatusCode = call.code()
    details: str = call.details() or ""
    for key, value in call.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return from_status_proto(status)
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(details)
    plain = PaperclipError(details, reason=code.name)
    plain.code = code
    return plain


__all__ = [
    "DOMAIN",
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PaperclipError",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "WireStatus",
    "from_rpc_error",
    "from_status_proto",
    "invalid",
    "to_status_proto",
    "to_wire_status",
]
