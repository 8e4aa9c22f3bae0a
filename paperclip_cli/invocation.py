"""What every command is given: the connection and the output format, from the global
options, and the one way to run its calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from paperclip_cli.connection import Connection, run_with_client
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.output import Output

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient


@dataclass(frozen=True)
class Invocation:
    """The global options of one ``paperclip`` invocation."""

    connection: Connection
    output: Output

    @classmethod
    def of(cls, ctx: typer.Context) -> Invocation:
        """The invocation the root callback stored on the context."""
        found = ctx.find_object(Invocation)
        assert found is not None, "the root callback sets the invocation"
        return found

    def call(self, work: Callable[[PaperclipClient], Awaitable[ExitCode | None]]) -> None:
        """Run ``work`` against the gateway; exit with its code (0 unless it failed)."""
        code = run_with_client(self.connection, self.output, work)
        if code is not ExitCode.OK:
            raise typer.Exit(int(code))


def call(ctx: typer.Context, work: Callable[[PaperclipClient], Awaitable[ExitCode | None]]) -> None:
    """``Invocation.of(ctx).call(work)``."""
    Invocation.of(ctx).call(work)


def output(ctx: typer.Context) -> Output:
    """The invocation's output."""
    return Invocation.of(ctx).output


__all__ = ["Invocation", "call", "output"]
