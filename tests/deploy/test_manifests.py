"""The deployment artefacts: ``make deploy-check`` on the repository's manifests and on
broken copies of them, what the rendered workloads must hold (probes, resources,
shutdown budgets, security, host-bound layout), and the Dockerfile.

Nothing here is skipped: without kubectl the checker, and so these tests, fail."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import pytest
from paperclip_client import GATEWAY_HEALTH_SERVICE

from common.channels import LIVE_HEALTH_SERVICE
from common.server import SHUTDOWN_GRACE_SECONDS
from deploy import check
from run_service.runner import DISPATCH_STOP_SECONDS, STOP_TIMEOUT_SECONDS
from workspace_service.service_process import KILL_GRACE_S

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
OVERLAYS = ("local", "production")
#: The host pod's stop budget, in order: the run service (server grace, the dispatch
#: pass in flight, its executions, the after-run steps' extra wait), then the workspace
#: sidecar (server grace, its runtime services' kill grace).
HOST_STOP_SECONDS = (
    SHUTDOWN_GRACE_SECONDS
    + DISPATCH_STOP_SECONDS
    + STOP_TIMEOUT_SECONDS
    + 5.0
    + SHUTDOWN_GRACE_SECONDS
    + KILL_GRACE_S
)

Object = dict[str, Any]


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    """``python -m deploy.check root``, as ``make deploy-check`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "deploy.check", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def broken_copy(tmp_path: Path, relative: str, old: str, new: str) -> Path:
    """A copy of the manifests with the first ``old`` in ``relative`` replaced."""
    root = tmp_path / "kubernetes"
    if not root.exists():
        shutil.copytree(MANIFESTS, root)
    path = root / relative
    text = path.read_text()
    assert old in text, f"{relative} no longer contains {old!r}: update the test"
    path.write_text(text.replace(old, new, 1))
    return root


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    """Each overlay's rendered objects."""
    return {name: check.render(MANIFESTS / "overlays" / name) for name in OVERLAYS}


def named(objects: Sequence[Object], kind: str, name: str) -> Object:
    """The object of ``kind`` named ``name``."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: Sequence[Object]) -> list[Object]:
    """The long-running workloads."""
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def servers(workload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The containers of a workload that serve: its containers and sidecars."""
    pod = workload["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*sidecars, *pod["containers"]]


def env(container: Mapping[str, Any]) -> dict[str, Any]:
    """A container's env entries by name: the value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def listen_port(container: Mapping[str, Any]) -> int:
    """The gRPC port of the ``PAPERCLIP_*_ADDR`` a container listens on (0.0.0.0:port)."""
    ports = [
        int(value.rsplit(":", 1)[1])
        for key, value in env(container).items()
        if key.endswith("_ADDR")
        and key != "PAPERCLIP_METRICS_ADDR"
        and isinstance(value, str)
        and value.startswith("0.0.0.0:")
    ]
    assert len(ports) == 1, f"{container['name']} listens on {ports}"
    return ports[0]


def all_containers(objects: Sequence[Object]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(workload name, container) for every container of every pod template."""
    for obj in objects:
        for pod in check.pod_specs(obj):
            for container in check.containers(pod):
                yield obj["metadata"]["name"], container


# -- the checker -------------------------------------------------------------------


def test_kubectl_is_installed() -> None:
    assert shutil.which("kubectl"), "kubectl is needed to render the kustomizations"


def test_deploy_check_passes_on_the_repository_manifests() -> None:
    done = run_check(MANIFESTS)
    assert done.returncode == 0, done.stderr
    assert "valid against Kubernetes 1.32" in done.stdout


def test_deploy_check_names_a_deployment_with_a_non_integer_replica_count(
    tmp_path: Path,
) -> None:
    root = broken_copy(tmp_path, "base/issue-service.yaml", "replicas: 2", 'replicas: "two"')
    done = run_check(root)
    assert done.returncode == 1
    assert "Deployment paperclip/issue-service (base/issue-service.yaml)" in done.stderr
    assert "spec.replicas: 'two' is not of type 'integer'" in done.stderr


def test_deploy_check_names_a_grpc_probe_without_its_port(tmp_path: Path) -> None:
    probe = "livenessProbe:\n            grpc:\n              port: 50051\n"
    root = broken_copy(tmp_path, "base/gateway.yaml", probe, "livenessProbe:\n            grpc:\n")
    done = run_check(root)
    assert done.returncode == 1
    assert "Deployment paperclip/gateway" in done.stderr
    assert "livenessProbe.grpc: 'port' is a required property" in done.stderr


def test_deploy_check_names_a_workload_whose_secret_the_overlay_lacks(tmp_path: Path) -> None:
    root = broken_copy(
        tmp_path, "overlays/local/kustomization.yaml", "- name: paperclip-secrets", "- name: x"
    )
    done = run_check(root)
    assert done.returncode == 1
    assert "overlays/local: Deployment paperclip/gateway: refers to Secret paperclip-secrets" in (
        done.stderr
    )


def test_deploy_check_names_a_reference_to_a_database_secret_without_its_cluster(
    tmp_path: Path,
) -> None:
    # The Cluster renamed: its operator would make other-db-app, not paperclip-db-app.
    broken_copy(tmp_path, "components/cloudnative-pg/cluster.yaml", "paperclip-db", "other-db")
    root = broken_copy(
        tmp_path, "overlays/local/small.yaml", "name: paperclip-db\n", "name: other-db\n"
    )
    done = run_check(root)
    assert done.returncode == 1
    assert (
        "overlays/local: Deployment paperclip/gateway: refers to Secret paperclip-db-app, "
        "which the overlay does not define"
    ) in done.stderr


def test_deploy_check_names_an_invalid_custom_resource(tmp_path: Path) -> None:
    root = broken_copy(
        tmp_path, "components/cloudnative-pg/cluster.yaml", "instances: 3", "instances: three"
    )
    done = run_check(root)
    assert done.returncode == 1
    assert "Cluster paperclip-db (components/cloudnative-pg/cluster.yaml)" in done.stderr
    assert "spec.instances: must be a positive integer" in done.stderr


def test_deploy_check_fails_clearly_without_kubectl() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy.check"],
        cwd=REPO,
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert "deploy-check: kubectl not found" in done.stderr


def test_an_unknown_kind_is_an_error_not_a_skip() -> None:
    obj = {"apiVersion": "postgresql.cnpg.io/v2", "kind": "Cluster", "metadata": {"name": "x"}}
    assert check.validate(obj) == [
        "no schema for Cluster postgresql.cnpg.io/v2 in Kubernetes 1.32, "
        "and not a custom resource this check knows"
    ]


# -- what the workloads hold ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_server_has_grpc_readiness_and_liveness_probes_on_its_port(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for workload in workloads(rendered[overlay]):
        for container in servers(workload):
            port = listen_port(container)
            declared = {p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = container[probe]["grpc"]
                assert grpc["port"] == port, (workload["metadata"]["name"], probe)
                assert port in declared


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_reference_names_a_variable_defined_before_it(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    # Kubernetes expands $(NAME) only from entries earlier in the list, and a strategic
    # merge patch may move the entries it touches to the front.
    for workload, container in all_containers(rendered[overlay]):
        defined: set[str] = set()
        for entry in container.get("env", []):
            for name in re.findall(r"\$\(([A-Z_]+)\)", entry.get("value", "")):
                assert name in defined, (workload, container["name"], entry["name"], name)
            defined.add(entry["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_check_the_process_itself_not_what_it_depends_on(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    # A database or backend outage must neither restart pods nor empty the Services:
    # the replicas keep answering, with the reason (UNAVAILABLE DATABASE_UNAVAILABLE).
    for workload in workloads(rendered[overlay]):
        for container in servers(workload):
            expected = (
                GATEWAY_HEALTH_SERVICE
                if workload["metadata"]["name"] == "gateway"
                else LIVE_HEALTH_SERVICE
            )
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["service"] == expected, (
                    workload["metadata"]["name"],
                    container["name"],
                    probe,
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resource_requests_and_limits(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for workload, container in all_containers(rendered[overlay]):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (workload, bound)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_preStop_and_each_services_shutdown(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for workload in workloads(rendered[overlay]):
        pod = workload["spec"]["template"]["spec"]
        pre_stop = sum(
            int(c["lifecycle"]["preStop"]["exec"]["command"][1])
            for c in pod["containers"]
            if "lifecycle" in c
        )
        needed = HOST_STOP_SECONDS if workload["kind"] == "StatefulSet" else SHUTDOWN_GRACE_SECONDS
        assert pod["terminationGracePeriodSeconds"] > pre_stop + needed, workload["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_as_non_root_without_privileges(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for obj in rendered[overlay]:
        for pod in check.pod_specs(obj):
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] != 0
            assert pod["automountServiceAccountToken"] is False
            for container in check.containers(pod):
                own = container["securityContext"]
                assert own["allowPrivilegeEscalation"] is False
                assert own["capabilities"]["drop"] == ["ALL"]
                assert "add" not in own["capabilities"]
                assert not own.get("privileged", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateless_deployments_roll_without_losing_a_ready_replica(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    for obj in rendered[overlay]:
        if obj["kind"] == "Deployment":
            strategy = obj["spec"]["strategy"]
            assert strategy["type"] == "RollingUpdate"
            assert strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_disruption_budget(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    budgets = [o for o in rendered[overlay] if o["kind"] == "PodDisruptionBudget"]
    for workload in workloads(rendered[overlay]):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(
            b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets
        ), workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_and_workspace_services_share_one_host_pod(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    host = named(rendered[overlay], "StatefulSet", "paperclip-host")
    by_name = {c["name"]: c for c in servers(host)}
    assert set(by_name) == {"run-service", "workspace-service"}
    assert by_name["run-service"]["args"] == ["python", "-m", "run_service"]
    assert by_name["workspace-service"]["args"] == ["python", "-m", "workspace_service"]
    homes = set()
    for container in by_name.values():
        variables = env(container)
        assert variables["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert variables["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert variables["PAPERCLIP_HOST"] == "$(POD_NAME)"
        assert variables["PAPERCLIP_ADVERTISE_ADDR"] == f"$(POD_IP):{listen_port(container)}"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        homes.add(mounts[variables["PAPERCLIP_HOME"]])
    assert homes == {"home"}
    claims = [c["metadata"]["name"] for c in host["spec"]["volumeClaimTemplates"]]
    assert claims == ["home"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_callers_reach_each_backend_through_its_headless_service(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    ports = {}
    for name in ("issue-service", "run-service", "workspace-service"):
        service = named(objects, "Service", name)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is False
        (port,) = service["spec"]["ports"]
        ports[name] = port["port"]
    target = re.compile(r"dns:///([a-z-]+)\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:(\d+)")
    seen = 0
    for workload in workloads(objects):
        for container in servers(workload):
            for key, value in env(container).items():
                match = target.fullmatch(value) if isinstance(value, str) else None
                if key.endswith("_SERVICE_ADDR") and match:
                    assert ports[match[1]] == int(match[2]), (container["name"], key)
                    assert key == f"PAPERCLIP_{match[1].upper().replace('-', '_')}_ADDR"
                    seen += 1
    assert seen == 5  # gateway: three backends; run service: issue and workspace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_the_migration_job_needs_is_applied_with_it_first(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    objects = rendered[overlay]
    first = {
        (o["kind"], o["metadata"]["name"])
        for o in objects
        if o["metadata"].get("labels", {}).get("paperclip.dev/apply-first") == "true"
    }
    job = named(objects, "Job", "paperclip-migrate")
    (pod,) = check.pod_specs(job)
    needs = {("Namespace", "paperclip"), ("Job", "paperclip-migrate")}
    needs.add(("ServiceAccount", pod["serviceAccountName"]))
    needs |= set(check.references(pod)) - check.operator_made(objects)
    if overlay == "local":
        needs.add(("Cluster", "paperclip-db"))
    assert needs <= first
    assert not [o for o in workloads(objects) if (o["kind"], o["metadata"]["name"]) in first]


def test_every_command_is_python_m_a_module_of_the_suite(
    rendered: dict[str, list[Object]],
) -> None:
    modules = set()
    for _, container in all_containers(rendered["local"]):
        assert "command" not in container, "command would replace the image's tini"
        python, flag, module = container["args"]
        assert (python, flag) == ("python", "-m")
        assert importlib.util.find_spec(module) is not None, module
        modules.add(module)
    assert modules == {
        "issue_service",
        "run_service",
        "workspace_service",
        "gateway",
        "common.migrate",
    }


def test_local_overlay_runs_one_replica_of_each_on_cloudnative_pg(
    rendered: dict[str, list[Object]],
) -> None:
    objects = rendered["local"]
    for workload in workloads(objects):
        assert int(workload["spec"]["replicas"]) == 1
    assert named(objects, "Cluster", "paperclip-db")["spec"]["instances"] == 1
    for _, container in all_containers(objects):
        url = env(container)["PAPERCLIP_DATABASE_URL"]
        assert url == {"secretKeyRef": {"name": "paperclip-db-app", "key": "uri"}}


# -- the Dockerfile ------------------------------------------------------------------


def dockerfile_stages() -> list[list[dockerfile.Command]]:
    """The Dockerfile's stages, parsed by BuildKit's own parser (the ``dockerfile``
    package): each a list of instructions, starting with its FROM."""
    stages: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def instructions(stage: Sequence[dockerfile.Command], keyword: str) -> list[dockerfile.Command]:
    """Every ``keyword`` instruction of ``stage``."""
    return [command for command in stage if command.cmd.upper() == keyword]


def test_dockerfile_builds_in_a_builder_stage_and_runs_in_a_slim_final_one() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    builder, final = stages
    assert builder[0].value == ("${PYTHON_IMAGE}", "AS", "builder")
    assert final[0].value == ("${PYTHON_IMAGE}",)
    base = dockerfile.parse_file(str(REPO / "Dockerfile"))[0]
    assert base.cmd.upper() == "ARG"
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11[\w.-]*-slim[\w.-]*", base.value[0])
    built = "\n".join(c.value[0] for c in instructions(builder, "RUN"))
    assert "grpc_tools.protoc" in built
    assert "python -m venv /opt/paperclip/venv" in built
    copies = [(c.flags, c.value) for c in instructions(final, "COPY")]
    assert copies == [
        (("--from=builder",), ("/opt/paperclip/venv", "/opt/paperclip/venv")),
        (("--from=builder",), ("/app", "/app")),
    ]


def test_final_stage_has_no_compiler_and_runs_as_a_numeric_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    packages = [
        word
        for run in instructions(final, "RUN")
        for command in run.value[0].split("&&")
        if "apt-get install" in command
        for word in command.split()
        if not word.startswith("-") and word not in ("apt-get", "install")
    ]
    assert packages == ["git", "tini"]
    compilers = {"gcc", "g++", "clang", "cc", "build-essential", "make"}
    assert not compilers & set(packages)
    assert not [p for p in packages if p.endswith("-dev")]
    (user,) = instructions(final, "USER")
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("/usr/bin/tini", "--")
    (cmd,) = instructions(final, "CMD")
    assert cmd.json and cmd.value[:2] == ("python", "-m")
    assert importlib.util.find_spec(cmd.value[2]) is not None


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        command.value[0]
        for stage in dockerfile_stages()
        for command in instructions(stage, "COPY")
        if not command.flags
    }
    assert copied == allowed
    for source in copied:
        assert (REPO / source).exists(), source
