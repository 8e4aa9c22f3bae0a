SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := install

# The interpreter the virtualenv is built from: python3.11 when installed, else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALLED := $(VENV)/.installed

# Generated protobuf code: build output only (gitignored), regenerated when a .proto
# changes or when the set of .proto files changes (the stamp holds the list).
GEN := paperclip
PROTOS := $(sort $(shell find protos -name '*.proto' 2>/dev/null))
PROTO_STAMP := $(GEN)/.generated
SCRATCH := $(VENV)/proto-build
# The well-known types (google/protobuf/*.proto) bundled with grpcio-tools.
GRPC_INCLUDE := import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")
ifneq ($(strip $(shell cat $(PROTO_STAMP) 2>/dev/null)),$(strip $(PROTOS)))
$(PROTO_STAMP): .FORCE
endif

.PHONY: install proto run test lint deploy-check bench dist clean .FORCE

install: $(INSTALLED) proto

$(PY):
	$(PYTHON) -m venv $(VENV)

# The generated package must exist before the editable install, which maps the
# top-level packages it finds at install time.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml | $(PY)
	mkdir -p $(GEN) && touch $(GEN)/__init__.py
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps -e clients/python
	touch $@

proto: $(PROTO_STAMP)

# Generate into a scratch directory first, so a failing protoc never leaves a
# half-written package behind, then swap it in. The protoc-gen-mypy* plugins are
# found on PATH, in the virtualenv.
$(PROTO_STAMP): $(PROTOS) $(INSTALLED)
	rm -rf $(SCRATCH) && mkdir -p $(SCRATCH)/$(GEN)
	$(if $(PROTOS),PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc \
		-Iprotos -I"$$($(PY) -c '$(GRPC_INCLUDE)')" \
		--python_out=$(SCRATCH) --grpc_python_out=$(SCRATCH) \
		--mypy_out=quiet:$(SCRATCH) --mypy_grpc_out=quiet:$(SCRATCH) $(PROTOS))
	find $(SCRATCH)/$(GEN) -type d -exec touch {}/__init__.py \;
	echo '$(PROTOS)' > $(SCRATCH)/$(PROTO_STAMP)
	rm -rf $(GEN) && mv $(SCRATCH)/$(GEN) $(GEN) && rm -rf $(SCRATCH)

run: install
	exec $(PY) -m local_suite.launcher

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint

# Renders every kustomization under deploy/kubernetes (kubectl kustomize, offline) and
# validates each object against the Kubernetes schemas (kubernetes-validate).
deploy-check: install
	$(PY) -m deploy.check

bench: install
	$(PY) -m bench

# The client distribution: the typed client and the generated stubs, as a wheel in dist/.
CLIENT_STAGE := $(VENV)/client-build
DIST ?= dist
dist: install
	rm -rf $(CLIENT_STAGE) && mkdir -p $(CLIENT_STAGE) $(DIST)
	cp -r clients/python/pyproject.toml clients/python/README.md clients/python/paperclip_client $(CLIENT_STAGE)/
	cp -r $(GEN) $(CLIENT_STAGE)/$(GEN)
	find $(CLIENT_STAGE) -name __pycache__ -prune -exec rm -rf {} +
	$(PY) -m pip wheel --no-deps --no-build-isolation -w $(DIST) $(CLIENT_STAGE)
	rm -rf $(CLIENT_STAGE)

clean:
	rm -rf $(VENV) $(GEN) *.egg-info dist clients/python/*.egg-info
