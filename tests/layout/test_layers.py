"""The packages' layers: each package imports only from the ones below it, and the image
holds every package its processes import.

    supervision, paperclip_client   (nothing of ours)
    common                          RPC and data plumbing
    issue_service, run_service, workspace_service, gateway
    local_suite, paperclip_cli      what runs the suite on one machine, the command line
"""

from __future__ import annotations

import pytest

from tests.deploy.test_manifests import dockerfile_stages, instructions
from tests.layout.imports import (
    GENERATED,
    PACKAGES,
    closure,
    cycles,
    imported_modules,
    source_files,
)

SERVICES = ("issue_service", "run_service", "workspace_service", "gateway")
# What each package may import, besides itself and the generated protobuf package.
ALLOWED = {
    "supervision": set(),
    "paperclip_client": set(),
    "common": {"supervision", "paperclip_client"},
    **{service: {"common", "supervision", "paperclip_client"} for service in SERVICES},
    "local_suite": {"common", "supervision", "gateway"},
    "paperclip_cli": {"common", "paperclip_client", "gateway"},
}
# The processes the image runs (its CMD and the manifests' args).
IMAGE_PROCESSES = (*SERVICES, "common.migrate")


def test_every_package_has_a_layer() -> None:
    assert set(ALLOWED) == set(PACKAGES)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_from_the_layers_below(package: str) -> None:
    crossings = sorted(
        f"{module} imports {imported}"
        for module, path in source_files(package)
        for imported in imported_modules(path, module)
        if (top := imported.partition(".")[0]) in PACKAGES
        and top != package
        and top not in ALLOWED[package]
    )
    assert crossings == []


def test_services_do_not_import_each_other() -> None:
    for service in SERVICES:
        reached = {module.partition(".")[0] for module in closure([service])}
        assert reached & set(SERVICES) == {service}, service


def test_the_image_copies_every_package_its_processes_import() -> None:
    copied = {
        command.value[1].removeprefix("/app/")
        for stage in dockerfile_stages()
        for command in instructions(stage, "COPY")
        if not command.flags and command.value[1].startswith("/app/")
    }
    needed = {module.partition(".")[0] for module in closure(IMAGE_PROCESSES)}
    assert "local_suite" not in needed
    assert needed - {GENERATED} <= copied


def test_no_modules_import_one_another_in_a_circle() -> None:
    graph = {
        module: imported_modules(path, module, at_load=True)
        for package in PACKAGES
        for module, path in source_files(package)
    }
    assert cycles(graph) == []


def test_cycles_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
