"""Following a run live through ``RunService/WatchRun``, and printing its events.

For people, an output event's text goes to stdout (stdout) or stderr (stderr) the moment
it arrives, as the agent wrote it; lifecycle and error events are ``* ...`` lines on
stderr. ``--json`` prints one JSON object per event per line (NDJSON). The stream ends
after the run's terminal event; the exit code then says how the run ended.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from paperclip_cli.deferred import run_messages_pb2, runs_pb2
from paperclip_cli.exit_codes import ExitCode
from paperclip_cli.output import Output, short_enum, to_dict

if TYPE_CHECKING:
    from paperclip_client import PaperclipClient


def print_event(event: run_messages_pb2.RunEvent, output: Output) -> None:
    """One event, flushed at once."""

    if output.as_json:
        sys.stdout.write(json.dumps(to_dict(event), sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    if event.type == run_messages_pb2.RUN_EVENT_TYPE_STDOUT:
        sys.stdout.write(event.message)
        sys.stdout.flush()
    elif event.type == run_messages_pb2.RUN_EVENT_TYPE_STDERR:
        sys.stderr.write(event.message)
        sys.stderr.flush()
    else:
        kind = short_enum("RunEventType", run_messages_pb2.RunEventType.Name(event.type))
        output.note(f"* {kind}: {event.message.rstrip()}")


def run_outcome(run: run_messages_pb2.Run, output: Output) -> ExitCode:
    """Report how a finished run ended; ``RUN_UNSUCCESSFUL`` unless it succeeded."""

    status = short_enum("RunStatus", run_messages_pb2.RunStatus.Name(run.status))
    if not output.as_json:
        detail = f" ({run.error_code}: {run.error})" if run.error_code else ""
        output.note(f"* run {run.id} {status}{detail}")
    if run.status == run_messages_pb2.RUN_STATUS_SUCCEEDED:
        return ExitCode.OK
    return ExitCode.RUN_UNSUCCESSFUL


async def watch(
    client: PaperclipClient, run_id: str, output: Output, after_seq: int = 0
) -> ExitCode:
    """Print the run's events as they happen until it ends; its outcome."""

    stream = client.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, after_seq=after_seq))
    async for event in stream:
        print_event(event, output)
    run = await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id))
    return run_outcome(run, output)


__all__ = ["print_event", "run_outcome", "watch"]
