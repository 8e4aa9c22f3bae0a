"""The real ``paperclip`` command against a real suite: ``python -m local_suite.launcher`` on
a home and a free gateway port of its own and a fresh database on the test session's
PostgreSQL server. One suite serves every CLI test (starting one takes seconds); each
test makes its own company, so tests never see each other's rows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from paperclip_client import PaperclipClient

from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2
from tests.databases import fresh_database
from tests.harness import unique_prefix

PAPERCLIP = str(Path(sys.executable).with_name("paperclip"))
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any ``PAPERCLIP_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
    env.update(extra)
    return env


def read_until(stream: IO[bytes], marker: str) -> list[str]:
    """Lines of ``stream`` up to and including the first that contains ``marker``."""
    seen = []
    for raw in iter(stream.readline, b""):
        seen.append(raw.decode())
        if marker in seen[-1]:
            return seen
    raise AssertionError(f"{marker!r} never came: {seen}")


@dataclass
class Result:
    """One finished ``paperclip`` invocation."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout as JSON."""
        return json.loads(self.stdout)

    def error(self) -> dict[str, Any]:
        """The ``--json`` error object on stderr."""
        body: dict[str, Any] = json.loads(self.stderr)["error"]
        return body


@dataclass
class Cli:
    """Runs ``paperclip`` as an operator of one suite would: its gateway in
    ``PAPERCLIP_GATEWAY_ADDR``, its home (with the board token) in ``PAPERCLIP_HOME``."""

    gateway: str
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            PAPERCLIP_GATEWAY_ADDR=self.gateway, PAPERCLIP_HOME=str(self.home), **extra
        )

    def run(self, *args: str, **env: str) -> Result:
        """``paperclip ARGS`` to completion."""
        done = subprocess.run(
            [PAPERCLIP, *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT_S,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, **env: str) -> Result:
        """``paperclip ARGS``, which must succeed."""
        result = self.run(*args, **env)
        assert result.code == 0, f"paperclip {' '.join(args)}: {result.code}\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        """``paperclip --json ARGS``' output, which must succeed."""
        return self.ok("--json", *args).json()

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """``paperclip ARGS`` running, stdout piped unbuffered."""
        return subprocess.Popen(
            [PAPERCLIP, *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )


class Launcher:
    """``python -m local_suite.launcher`` on ``home`` and ``gateway`` with the database ``url``."""

    def __init__(self, home: Path, gateway: str, url: str) -> None:
        self.home = home
        self.gateway = gateway
        self.ready = home / "suite.json"
        self.log = home / "launcher.log"
        env = clean_env(
            PAPERCLIP_HOME=str(home),
            PAPERCLIP_GATEWAY_ADDR=gateway,
            PAPERCLIP_READY_FILE=str(self.ready),
            PAPERCLIP_DATABASE_URL=url,
            PAPERCLIP_DISPATCH_POLL_MS="200",
            PAPERCLIP_LOG_LEVEL="WARNING",
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "local_suite.launcher"],
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the suite did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (the launcher stops its services), SIGKILL of its group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="package")
async def suite_database(server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for the suite."""
    async with fresh_database(server_url, "paperclip_cli") as url:
        yield url


@pytest.fixture(scope="package")
def cli(suite_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """The suite, started once for every CLI test, and the command pointed at it."""
    home = tmp_path_factory.mktemp("cli-home")
    launcher = Launcher(home, f"127.0.0.1:{free_port()}", suite_database)
    try:
        launcher.wait_ready()
        yield Cli(launcher.gateway, home)
    finally:
        launcher.stop()


class Board:
    """Setup through the typed client, in-process, for what a test does not check the
    command for (each ``paperclip`` run costs a process start)."""

    def __init__(self, cli: Cli) -> None:
        self.gateway = cli.gateway
        self.token = (cli.home / "board-token").read_text().strip()

    def _call(self, work: Callable[[PaperclipClient], Awaitable[Message]]) -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            async with PaperclipClient(self.gateway, self.token) as client:
                reply = await work(client)
            return json_format.MessageToDict(reply, preserving_proto_field_name=True)

        return asyncio.run(main())

    def company(self, name: str) -> dict[str, Any]:
        request = issues_pb2.CreateCompanyRequest(name=name, issue_prefix=unique_prefix())
        return self._call(lambda c: c.issues.CreateCompany(request))

    def agent(
        self, company_id: str, name: str, *command: str, wake_on_demand: bool = True
    ) -> dict[str, Any]:
        request = agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=name,
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=command),
            runtime_config=agents_pb2.RuntimeConfig(wake_on_demand=wake_on_demand, grace_seconds=1),
        )
        return self._call(lambda c: c.runs.CreateAgent(request))

    def issue(self, company_id: str, title: str, **fields: Any) -> dict[str, Any]:
        request = issues_pb2.CreateIssueRequest(company_id=company_id, title=title, **fields)
        return self._call(lambda c: c.issues.CreateIssue(request))

    def wake(self, agent_id: str) -> str:
        """The id of the run a wake queued."""
        request = runs_pb2.WakeAgentRequest(
            agent_id=agent_id, source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND
        )
        run_id: str = self._call(lambda c: c.runs.WakeAgent(request))["run"]["id"]
        return run_id


@pytest.fixture(scope="package")
def board(cli: Cli) -> Board:
    """Setup calls on the suite of ``cli``."""
    return Board(cli)
