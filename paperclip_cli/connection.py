"""Where the gateway is, which token to send, and running one command's calls.

The address comes from ``--gateway`` / ``PAPERCLIP_GATEWAY_ADDR``; the token from
``--token`` / ``PAPERCLIP_TOKEN``, else the ``board-token`` file the launcher writes in
``PAPERCLIP_HOME`` (default ``./.paperclip``). grpc, the generated stubs and the typed
client are imported only once a command calls the gateway, so ``--help`` and shell
completion stay quick.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from paperclip_cli.deferred import errors, gateway_client
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.failures import report_call_failure, report_cli_failure

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient

    from paperclip_cli.output import Output

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_HOME = ".paperclip"
BOARD_TOKEN_FILE = "board-token"


class CliFailure(Exception):
    """A failure the command reports itself (not a failed call): a message, what to do,
    and the exit code."""

    def __init__(self, message: str, *, hint: str = "", exit_code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    """The gateway to call and the token to call it with."""

    gateway: str
    #: Empty when none was given and the home has no board token.
    token: str
    #: Where the token came from, for error messages.
    token_source: str


def resolve_connection(gateway: str | None, token: str | None, home: str | None) -> Connection:
    """The connection from the global options (already merged with their environment
    variables by the option parser)."""
    address = (gateway or "").strip() or DEFAULT_GATEWAY
    if token and token.strip():
        return Connection(address, token.strip(), "--token / PAPERCLIP_TOKEN")
    path = Path(home or DEFAULT_HOME).expanduser() / BOARD_TOKEN_FILE
    try:
        from_file = path.read_text().strip()
    except OSError:
        from_file = ""
    return Connection(address, from_file, str(path.resolve()))


def no_token(connection: Connection) -> CliFailure:
    """The failure of a command that needs a token when none was found."""
    return CliFailure(
        f"no token: none given and nothing in {connection.token_source}",
        hint=(
            "pass --token or set PAPERCLIP_TOKEN, or point PAPERCLIP_HOME (--home) at the "
            "directory where `make run` wrote board-token"
        ),
        exit_code=ExitCode.NOT_ALLOWED,
    )


def run_with_client(
    connection: Connection,
    output: Output,
    work: Callable[[PaperclipClient], Awaitable[ExitCode | None]],
) -> ExitCode:
    """Run ``work`` with a client on the gateway; failures are reported on stderr and
    become the exit code (``exit_codes``)."""

    async def main() -> ExitCode | None:
        if not connection.token:
            raise no_token(connection)
        async with gateway_client.PaperclipClient(connection.gateway, connection.token) as client:
            return await work(client)

    try:
        return asyncio.run(main()) or ExitCode.OK
    except errors.PaperclipError as error:
        return report_call_failure(error, connection, output)
    except CliFailure as failure:
        return report_cli_failure(failure, output)
    except errors.ConfigError as error:
        return report_cli_failure(
            CliFailure(str(error), exit_code=ExitCode.USAGE, hint="check --gateway"), output
        )
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`paperclip runs watch RUN | head`): point stdout at
        # /dev/null so the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FAILURE


__all__ = [
    "BOARD_TOKEN_FILE",
    "DEFAULT_GATEWAY",
    "DEFAULT_HOME",
    "CliFailure",
    "Connection",
    "no_token",
    "resolve_connection",
    "run_with_client",
]
