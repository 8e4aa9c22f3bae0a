"""``make deploy-check``: render every kustomization under ``deploy/kubernetes`` and
validate each rendered object offline.

- Rendering is ``kubectl kustomize <dir>`` (kubectl bundles kustomize; no cluster is
  contacted). A component (``kind: Component``) is rendered on top of ``base``, through
  a kustomization written to a temporary directory.
- Every object is validated with ``kubernetes-validate`` against the JSON schemas of
  Kubernetes ``KUBERNETES_VERSION``, strictly (an unknown field is an error too).
- Custom resources have no schema there. The ones the manifests use (``CUSTOM_KINDS``)
  get a schema-less check of the fields the suite relies on; any other kind without a
  schema is an error (a typo in ``apiVersion`` must not pass unchecked).
- In a deployable overlay (``overlays/*``) every Secret and ConfigMap a pod refers to
  must be rendered too, or be one an operator makes for a rendered custom resource
  (``operator_made``).

Each problem names the kustomization, the object and the source files defining it.
Exit status: 0 when everything is valid, 1 on invalid manifests, 2 when the check cannot
run (no kubectl, a kustomization that does not render).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parent / "kubernetes"
KUBERNETES_VERSION = "1.32"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

Object = dict[str, Any]


class CheckError(RuntimeError):
    """The check itself cannot run; the message says why."""


@dataclass(frozen=True)
class Problem:
    """One invalid object of one rendered kustomization."""

    kustomization: str
    obj: str
    sources: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        where = f" ({', '.join(self.sources)})" if self.sources else ""
        return f"{self.kustomization}: {self.obj}{where}: {self.message}"


def describe(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` of a manifest object."""
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "<no name>")
    namespace = metadata.get("namespace")
    return f"{obj.get('kind', '<no kind>')} {f'{namespace}/' if namespace else ''}{name}"


# -- custom resources ----------------------------------------------------------------


def _check_cnpg_cluster(obj: Object) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ["spec: must be a mapping"]
    problems = []
    instances = spec.get("instances")
    if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
        problems.append(f"spec.instances: must be a positive integer, got {instances!r}")
    storage = spec.get("storage")
    if not isinstance(storage, dict) or not isinstance(storage.get("size"), str):
        problems.append("spec.storage.size: must be a quantity string such as '10Gi'")
    return problems


#: Custom resources the manifests use, by (apiVersion, kind): their schema-less check.
CUSTOM_KINDS: dict[tuple[str, str], Callable[[Object], list[str]]] = {
    ("postgresql.cnpg.io/v1", "Cluster"): _check_cnpg_cluster,
}


def operator_made(objects: Sequence[Object]) -> set[tuple[str, str]]:
    """The objects operators create for the rendered custom resources: the Secret
    ``<name>-app`` (the application's credentials) of each CloudNativePG Cluster."""
    return {
        ("Secret", f"{o['metadata']['name']}-app")
        for o in objects
        if (o.get("apiVersion"), o.get("kind")) == ("postgresql.cnpg.io/v1", "Cluster")
    }


# -- rendering -----------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl binary (``$KUBECTL`` or the one on ``PATH``)."""
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise CheckError(
            "kubectl not found (set KUBECTL or put kubectl >= 1.27 on PATH): the "
            "kustomizations are rendered with `kubectl kustomize`, offline"
        )
    return found


def kustomizations(root: Path, *, components: bool = False) -> list[Path]:
    """Every directory under ``root`` holding a kustomization (``components``: holding
    a Component instead)."""
    found = []
    for name in KUSTOMIZATION_FILES:
        for path in root.rglob(name):
            kind = _load_one(path).get("kind", "Kustomization")
            if (kind == "Component") == components:
                found.append(path.parent)
    return sorted(found)


def render(directory: Path) -> list[Object]:
    """The objects ``kubectl kustomize directory`` renders."""
    binary = kubectl()
    try:
        done = subprocess.run(
            [binary, "kustomize", str(directory)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise CheckError(f"cannot run {binary}: {exc}") from exc
    if done.returncode != 0:
        raise CheckError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_component(base: Path, component: Path) -> list[Object]:
    """The objects of ``base`` with ``component`` applied."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # kustomize refuses absolute paths here.
            "resources": [os.path.relpath(base, tmp)],
            "components": [os.path.relpath(component, tmp)],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        return render(Path(tmp))


def _load_one(path: Path) -> Object:
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def inputs(directory: Path) -> list[Path]:
    """The YAML files a kustomization reads: its resources and patches, and those of the
    kustomizations and components it includes."""
    path = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).exists()), None)
    if path is None:
        return []
    spec = _load_one(path)
    files: list[Path] = []
    entries = [*(spec.get("resources") or []), *(spec.get("components") or [])]
    entries += [p["path"] for p in spec.get("patches") or [] if isinstance(p, dict) and "path" in p]
    for entry in entries:
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            files += inputs(target)
        elif target.is_file():
            files.append(target)
    return files


def source_index(root: Path, files: Sequence[Path]) -> dict[tuple[str, str], list[str]]:
    """(kind, name) -> which of ``files`` define or patch it (relative to ``root``)."""
    index: dict[tuple[str, str], list[str]] = {}
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue  # the render reports it
        for doc in docs:
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                key = (str(doc.get("kind")), str(doc["metadata"].get("name")))
                where = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
                index.setdefault(key, []).append(where)
    return index


# -- validation ----------------------------------------------------------------------


def validate(obj: Object, version: str = KUBERNETES_VERSION) -> list[str]:
    """What is wrong with one object (empty: valid)."""
    if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        return ["apiVersion and kind must be strings"]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path) or "<root>"
        return [f"{path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        custom = CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
        if custom is None:
            return [
                f"no schema for {obj['kind']} {obj['apiVersion']} in Kubernetes {version}, "
                "and not a custom resource this check knows"
            ]
        if not isinstance((obj.get("metadata") or {}).get("name"), str):
            return ["metadata.name: must be a string"]
        return custom(obj)
    return []


def pod_specs(obj: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The pod spec of a workload (Deployment, StatefulSet, Job...), if it has one."""
    template = (obj.get("spec") or {}).get("template") or {}
    spec = template.get("spec")
    if isinstance(spec, dict):
        yield spec


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every container of a pod spec: init containers (sidecars included), then main."""
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def references(pod: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of each Secret and ConfigMap a pod spec reads."""
    for container in containers(pod):
        for source in container.get("envFrom") or []:
            for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if field in source:
                    yield kind, source[field]["name"]
        for env in container.get("env") or []:
            value_from = env.get("valueFrom") or {}
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if field in value_from:
                    yield kind, value_from[field]["name"]
    for volume in pod.get("volumes") or []:
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"]
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"]


def missing_references(objects: Sequence[Object]) -> dict[str, list[str]]:
    """Object description -> the Secrets and ConfigMaps it names that are not rendered."""
    rendered = {(o.get("kind"), (o.get("metadata") or {}).get("name")) for o in objects}
    rendered |= operator_made(objects)
    missing: dict[str, list[str]] = {}
    for obj in objects:
        for pod in pod_specs(obj):
            for ref in sorted(set(references(pod))):
                if ref not in rendered:
                    missing.setdefault(describe(obj), []).append(f"{ref[0]} {ref[1]}")
    return missing


def check(root: Path = ROOT, version: str = KUBERNETES_VERSION) -> tuple[list[Problem], int]:
    """Render and validate every kustomization and component under ``root``: the
    problems, and how many objects were checked."""
    root = root.resolve()
    targets: list[tuple[str, Path, list[Object]]] = []
    for directory in kustomizations(root):
        name = str(directory.relative_to(root)) if directory != root else "."
        targets.append((name, directory, render(directory)))
    for component in kustomizations(root, components=True):
        name = f"{component.relative_to(root)} (on base)"
        targets.append((name, component, render_component(root / "base", component)))
    problems: list[Problem] = []
    for name, directory, objects in targets:
        files = inputs(directory)
        if directory.parent.name == "components":
            files += inputs(root / "base")
        index = source_index(root, files)
        for obj in objects:
            key = (str(obj.get("kind")), str((obj.get("metadata") or {}).get("name")))
            sources = tuple(index.get(key, ()))
            problems += [Problem(name, describe(obj), sources, m) for m in validate(obj, version)]
        if directory.parent.name == "overlays":
            for described, refs in missing_references(objects).items():
                message = f"refers to {', '.join(refs)}, which the overlay does not define"
                problems.append(Problem(name, described, (), message))
    return problems, sum(len(objects) for _, _, objects in targets)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the manifests; print what is wrong, or a summary."""
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__)
    parser.add_argument("root", nargs="?", type=Path, default=ROOT)
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    try:
        problems, count = check(root, args.kubernetes_version)
    except CheckError as exc:
        print(f"deploy-check: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"deploy-check: {problem}", file=sys.stderr)
    if problems:
        print(f"deploy-check: {len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    renders = len(kustomizations(root)) + len(kustomizations(root, components=True))
    print(
        f"deploy-check: {count} objects in {renders} renders valid against Kubernetes "
        f"{args.kubernetes_version} (custom resources: schema-less check)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
