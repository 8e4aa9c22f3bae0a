"""The exit codes of ``paperclip``: what a script branches on.

A failed call exits with the code of its gRPC status (every reason of a code shares its
exit code); the ErrorInfo reason and what to do are printed on stderr, as JSON with
``--json``.

====  ==============================================  ====================================
exit  meaning                                         gRPC code (reason)
====  ==============================================  ====================================
0     success
1     any other failure                               INTERNAL, UNKNOWN, UNIMPLEMENTED, ...
2     usage: a bad option, or a request refused as    (command-line errors), INVALID_ARGUMENT,
      malformed                                       OUT_OF_RANGE
3     not found                                       NOT_FOUND (ISSUE_NOT_FOUND, ...)
4     conflict: the state forbids it now (also        FAILED_PRECONDITION, ABORTED,
      ``agents wake --watch`` when no run started)    ALREADY_EXISTS (ISSUE_CHECKOUT_CONFLICT,
                                                      CONCURRENT_MODIFICATION, ...)
5     not allowed: no, bad or revoked token, or no    UNAUTHENTICATED, PERMISSION_DENIED
      access
6     unavailable: the gateway or a service behind    UNAVAILABLE, DEADLINE_EXCEEDED
      it does not answer
7     the watched run ended without succeeding        (``runs watch``, ``agents wake --watch``)
130   interrupted (Ctrl-C)
====  ==============================================  ====================================
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The process exit status of a ``paperclip`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    NOT_ALLOWED = 5
    UNAVAILABLE = 6
    RUN_UNSUCCESSFUL = 7
    INTERRUPTED = 130


#: gRPC status code name -> exit code; codes not listed exit ``FAILURE``.
BY_STATUS_CODE: dict[str, ExitCode] = {
    "OK": ExitCode.OK,
    "INVALID_ARGUMENT": ExitCode.USAGE,
    "OUT_OF_RANGE": ExitCode.USAGE,
    "NOT_FOUND": ExitCode.NOT_FOUND,
    "FAILED_PRECONDITION": ExitCode.CONFLICT,
    "ABORTED": ExitCode.CONFLICT,
    "ALREADY_EXISTS": ExitCode.CONFLICT,
    "UNAUTHENTICATED": ExitCode.NOT_ALLOWED,
    "PERMISSION_DENIED": ExitCode.NOT_ALLOWED,
    "UNAVAILABLE": ExitCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": ExitCode.UNAVAILABLE,
}


def exit_code_for(status_code: str) -> ExitCode:
    """The exit code of a call that failed with ``status_code`` (a ``grpc.StatusCode``
    name)."""
    return BY_STATUS_CODE.get(status_code, ExitCode.FAILURE)


__all__ = ["BY_STATUS_CODE", "ExitCode", "exit_code_for"]
