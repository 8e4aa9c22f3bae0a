"""The configuration rules (stored form, merges, desired-state patches) and the command
definitions, as plain functions (scenarios 27, 28, 30)."""

from __future__ import annotations

from typing import Any

import pytest

from paperclip.workspaces.v1 import workspace_messages_pb2 as pb
from workspace_service import commands
from workspace_service.environment import sanitized_env
from workspace_service.workspace_config import (
    config_from_proto,
    config_to_proto,
    desired_state_patch,
    merge_config,
    read_config,
    service_state,
)


def test_scenario_12_sanitized_env_drops_paperclip_settings_and_keeps_the_rest() -> None:
    env = sanitized_env(
        {
            "PAPERCLIP_INTERNAL_KEY": "k",
            "PAPERCLIP_DATABASE_URL": "postgres://",
            "DATABASE_URL": "postgres://",
            "npm_config_tailscale_auth": "x",
            "npm_config_authenticated_private": "y",
            "HOST": "0.0.0.0",
            "PATH": "/bin",
        }
    )
    assert env == {"HOST": "0.0.0.0", "PATH": "/bin"}


def test_scenario_30_read_trims_strings_and_drops_empty_and_bad_values() -> None:
    config = read_config(
        {
            "provision_command": "  make setup  ",
            "teardown_command": "   ",
            "desired_state": "sideways",
            "service_states": {"0": "running", "1": "bogus", "x": "stopped"},
            "unknown": 1,
        }
    )
    assert config == {"provision_command": "make setup", "service_states": {"0": "running"}}


def test_scenario_30_an_all_empty_config_reads_as_none() -> None:
    assert read_config({"cleanup_command": " ", "runtime": {"services": [], "jobs": []}}) is None
    assert read_config(None) is None


def test_scenario_30_merge_changes_only_the_patched_keys() -> None:
    current = {"provision_command": "a", "cleanup_command": "b"}
    assert merge_config(current, {"cleanup_command": "c"}) == {
        "provision_command": "a",
        "cleanup_command": "c",
    }


def test_scenario_30_nulling_the_last_key_or_a_null_patch_removes_the_config() -> None:
    assert merge_config({"provision_command": "a"}, {"provision_command": None}) is None
    assert merge_config({"provision_command": "a", "cleanup_command": "b"}, None) is None


def test_config_round_trips_through_its_message() -> None:
    stored: dict[str, Any] = {
        "provision_command": "make",
        "environment_id": "7a3c1f2e-8d7b-4b41-9d8f-0c6f1e2a3b4c",
        "runtime": {
            "services": [{"name": "web", "command": "serve", "auto_port": True}],
            "jobs": [{"name": "lint", "command": "make lint"}],
        },
        "desired_state": "running",
        "service_states": {"0": "manual"},
    }
    assert config_from_proto(config_to_proto(stored)) == stored


def test_scenario_27_stop_of_one_index_keeps_the_others_running() -> None:
    patch = desired_state_patch(
        {"desired_state": "running"}, action="stop", service_count=2, index=1
    )
    assert patch == {
        "desired_state": "running",
        "service_states": {"0": "running", "1": "stopped"},
    }


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_scenario_27_manual_stays_manual(action: Any) -> None:
    patch = desired_state_patch(
        {"desired_state": "manual"}, action=action, service_count=2, index=None
    )
    assert patch == {"desired_state": "manual", "service_states": {"0": "manual", "1": "manual"}}


def test_start_of_everything_from_stopped_wants_every_service_running() -> None:
    patch = desired_state_patch(None, action="start", service_count=2, index=None)
    assert patch["desired_state"] == "running"
    assert service_state(patch, 0) == service_state(patch, 1) == "running"


@pytest.mark.parametrize(
    ("command", "explicit", "expected"),
    [
        ("pnpm dev", 0, 90),
        ("npm run dev -- --port 3000", 0, 90),
        ("yarn dev", 0, 90),
        ("node server.js", 0, 30),
        ("pnpm dev", 12, 12),
    ],
)
def test_scenario_28_readiness_timeouts(command: str, explicit: int, expected: int) -> None:
    definition = commands.CommandDef(
        id="service:web",
        name="web",
        kind="service",
        command=command,
        readiness=commands.Readiness(timeout_seconds=explicit),
    )
    assert definition.ready_timeout() == expected


def test_command_ids_names_and_indexes() -> None:
    config = {
        "runtime": {
            "services": [
                {"name": "Web App", "command": "serve"},
                {"command": "worker"},
                {"name": "Web App", "command": "serve2"},
            ],
            "jobs": [{"id": "Migrate DB", "command": "migrate"}, {"command": "lint"}],
        }
    }
    defs = commands.definitions(config)
    assert [(d.id, d.name, d.kind, d.service_index) for d in defs] == [
        ("service:web-app", "Web App", "service", 0),
        ("service:2", "Service 2", "service", 1),
        ("service:web-app-2", "Web App", "service", 2),
        ("migrate-db", "Job 1", "job", None),
        ("job:2", "Job 2", "job", None),
    ]
    assert commands.find(config, " migrate-db ") == defs[3]
    assert commands.find(config, "nope") is None


def test_readiness_interval_has_a_floor() -> None:
    fast = commands.CommandDef(
        id="s", name="s", kind="service", command="x", readiness=commands.Readiness(interval_ms=5)
    )
    assert fast.ready_interval() == 0.1
    assert (
        commands.CommandDef(id="s", name="s", kind="service", command="x").ready_interval() == 0.5
    )


def test_message_desired_states_survive_proto_form() -> None:
    message = pb.WorkspaceConfig(desired_state=pb.DESIRED_STATE_STOPPED)
    message.service_states[1] = pb.DESIRED_STATE_RUNNING
    assert config_from_proto(message) == {
        "desired_state": "stopped",
        "service_states": {"1": "running"},
    }
