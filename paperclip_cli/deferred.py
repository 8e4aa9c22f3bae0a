"""Modules the commands import on first use, not at start-up.

grpc, protobuf, the generated stubs, the typed client and Rich take most of a
command's start-up time; ``--help``, shell completion and a command that fails before
calling anything need none of them. Each name here stands for its module and imports it
the first time one of its attributes is read; type checkers see the ordinary import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


class _Deferred:
    """Stands for a module until one of its attributes is read, then imports it (an
    ordinary import: the module lands in ``sys.modules`` as usual) and reads from it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


if TYPE_CHECKING:
    from google.protobuf import field_mask_pb2, json_format
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from paperclip_client import client as gateway_client
    from paperclip_client import errors
    from rich import box as rich_box
    from rich import console as rich_console
    from rich import table as rich_table

    from common import config
    from gateway import routes
    from paperclip.gateway.v1 import auth_pb2
    from paperclip.issues.v1 import issues_pb2
    from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2
    from paperclip.workspaces.v1 import workspace_messages_pb2, workspaces_pb2
else:
    field_mask_pb2 = _Deferred("google.protobuf.field_mask_pb2")
    json_format = _Deferred("google.protobuf.json_format")
    health_pb2 = _Deferred("grpc_health.v1.health_pb2")
    health_pb2_grpc = _Deferred("grpc_health.v1.health_pb2_grpc")
    rich_box = _Deferred("rich.box")
    rich_console = _Deferred("rich.console")
    rich_table = _Deferred("rich.table")
    config = _Deferred("common.config")
    errors = _Deferred("paperclip_client.errors")
    gateway_client = _Deferred("paperclip_client.client")
    routes = _Deferred("gateway.routes")
    auth_pb2 = _Deferred("paperclip.gateway.v1.auth_pb2")
    issues_pb2 = _Deferred("paperclip.issues.v1.issues_pb2")
    agents_pb2 = _Deferred("paperclip.runs.v1.agents_pb2")
    run_messages_pb2 = _Deferred("paperclip.runs.v1.run_messages_pb2")
    runs_pb2 = _Deferred("paperclip.runs.v1.runs_pb2")
    workspace_messages_pb2 = _Deferred("paperclip.workspaces.v1.workspace_messages_pb2")
    workspaces_pb2 = _Deferred("paperclip.workspaces.v1.workspaces_pb2")

__all__ = [
    "agents_pb2",
    "auth_pb2",
    "config",
    "errors",
    "field_mask_pb2",
    "gateway_client",
    "health_pb2",
    "health_pb2_grpc",
    "issues_pb2",
    "json_format",
    "rich_box",
    "rich_console",
    "rich_table",
    "routes",
    "run_messages_pb2",
    "runs_pb2",
    "workspace_messages_pb2",
    "workspaces_pb2",
]
