# One image for every process of the suite; the command names the process:
#   python -m issue_service | run_service | workspace_service | gateway | common.migrate
# Build from the repository root:  docker build -t paperclip-core:<version> .
# The Kubernetes manifests (deploy/kubernetes) pass it as args, keeping tini as PID 1.

# Pin a patch release or a digest in production (python:3.11.x-slim-trixie@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# --- builder: the virtualenv and the generated protobuf package -----------------------
FROM ${PYTHON_IMAGE} AS builder

SHELL ["/bin/bash", "-eu", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The pins live in pyproject.toml only: the runtime dependencies go into the service
# virtualenv, grpcio-tools (protoc, a dev dependency) into a throwaway one. Binary wheels
# only: this stage has no compiler either, and a missing wheel should fail the build
# rather than start compiling. This layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c 'import pathlib, tomllib; \
    project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]; \
    dev = project["optional-dependencies"]["dev"]; \
    tools = [d for d in dev if d.startswith("grpcio-tools==")]; \
    pathlib.Path("requirements.txt").write_text("\n".join(project["dependencies"]) + "\n"); \
    pathlib.Path("protoc-requirements.txt").write_text("\n".join(tools) + "\n")'
RUN python -m venv /opt/paperclip/venv \
    && /opt/paperclip/venv/bin/pip install --only-binary=:all: -r requirements.txt \
    && python -m venv /opt/protoc \
    && /opt/protoc/bin/pip install --only-binary=:all: -r protoc-requirements.txt

# The generated package `paperclip/` (what `make proto` produces, minus the .pyi stubs).
# The .proto paths have no spaces: the unquoted $(find ...) is the list of files.
COPY protos ./protos
# hadolint ignore=SC2046
RUN mkdir -p /app \
    && /opt/protoc/bin/python -m grpc_tools.protoc \
        -Iprotos \
        -I"$(/opt/protoc/bin/python -c 'import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")')" \
        --python_out=/app --grpc_python_out=/app \
        $(find protos -name '*.proto' | sort) \
    && find /app/paperclip -type d -exec touch {}/__init__.py \;

# The services run from source (PYTHONPATH=/app): the Alembic migrations are read from
# common/migrations, which is not an installable package.
COPY common /app/common
COPY supervision /app/supervision
COPY issue_service /app/issue_service
COPY run_service /app/run_service
COPY workspace_service /app/workspace_service
COPY gateway /app/gateway
COPY clients/python/paperclip_client /app/paperclip_client

# --- final: no compilers, no build tools, a non-root user ------------------------------
FROM ${PYTHON_IMAGE}

# git: the workspace service makes git worktrees. tini: PID 1 that forwards SIGTERM to
# the service and reaps orphaned grandchildren of the agents and runtime services.
# Their versions are the base image's Debian release's (pin the base image by digest).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and fsGroup matches.
RUN groupadd --system --gid 10001 paperclip \
    && useradd --system --uid 10001 --gid paperclip --create-home \
        --home-dir /home/paperclip --shell /bin/sh paperclip \
    && mkdir -p /var/lib/paperclip \
    && chown paperclip:paperclip /var/lib/paperclip

COPY --from=builder /opt/paperclip/venv /opt/paperclip/venv
COPY --from=builder /app /app
# Byte-compiled at build time: the containers may run with a read-only root filesystem.
RUN /opt/paperclip/venv/bin/python -m compileall -q /app

ENV PATH=/opt/paperclip/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRPC_ENABLE_FORK_SUPPORT=false \
    PAPERCLIP_HOME=/var/lib/paperclip

WORKDIR /app
USER 10001:10001
EXPOSE 50051

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "gateway"]
