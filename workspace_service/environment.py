"""The environment of commands run on the host for a workspace: the service's own
environment without Paperclip's secrets, then the workspace variables, then the
command's own entries; and the ``{{name}}`` templates those entries and URLs may use."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from workspace_service.model import WorkspaceRecord

#: Removed from the inherited environment: Paperclip's own settings and secrets (the
#: internal key, the JWT secret, database URLs), and npm's auth settings.
_STRIPPED_PREFIXES = ("PAPERCLIP_", "npm_config_")
_STRIPPED_SUFFIX = "DATABASE_URL"
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


def sanitized_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without ``PAPERCLIP_*``,
    ``npm_config_*`` and any ``*DATABASE_URL``."""
    source = os.environ if base is None else base
    return {
        key: value
        for key, value in source.items()
        if not key.startswith(_STRIPPED_PREFIXES) and not key.endswith(_STRIPPED_SUFFIX)
    }


def workspace_env(workspace: WorkspaceRecord) -> dict[str, str]:
    """``PAPERCLIP_WORKSPACE_*`` and the ids a provision, cleanup or teardown command
    may need. Never secrets."""
    env = {
        "PAPERCLIP_WORKSPACE_ID": workspace.id,
        "PAPERCLIP_WORKSPACE_CWD": workspace.cwd or "",
        "PAPERCLIP_WORKSPACE_BRANCH": workspace.branch_name or "",
        "PAPERCLIP_WORKSPACE_BASE_REF": workspace.base_ref or "",
        "PAPERCLIP_WORKSPACE_REPO_PATH": workspace.repo_path or "",
        "PAPERCLIP_WORKSPACE_REPO_URL": workspace.repo_url or "",
        "PAPERCLIP_COMPANY_ID": workspace.company_id,
    }
    if workspace.source_issue_id:
        env["PAPERCLIP_ISSUE_ID"] = workspace.source_issue_id
    if workspace.project_id:
        env["PAPERCLIP_PROJECT_ID"] = workspace.project_id
    return env


def template_values(workspace: WorkspaceRecord, *, port: int | None = None) -> dict[str, str]:
    """What ``{{...}}`` may name: ``port`` and ``workspace.*``."""
    values = {
        "workspace.id": workspace.id,
        "workspace.cwd": workspace.cwd or "",
        "workspace.branch_name": workspace.branch_name or "",
        "workspace.repo_url": workspace.repo_url or "",
        "workspace.repo_path": workspace.repo_path or "",
        "workspace.base_ref": workspace.base_ref or "",
    }
    if port is not None:
        values["port"] = str(port)
    return values


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{{name}}`` replaced; an unknown name is left as written."""
    return _TEMPLATE.sub(lambda m: values.get(m.group(1), m.group(0)), template)
