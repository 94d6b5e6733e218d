# Every command the docs mention (docs/local-stack.md#commands); `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
UI_ARGS ?=
DEMO_ARGS ?=
# The venv's tools first: DeepSpeed JIT-builds a CPU op with `ninja` and rebuilds it whenever a
# different ninja (e.g. the system's) touched the cache; Ray workers use the venv's.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## Create .venv with every pinned dependency (seconds when nothing changed)
	@bash scripts/setup.sh

up: setup ## Start the local stack: S3 (SeaweedFS), MLflow, Ray head, Airflow
	@$(PY) scripts/stack.py up

down: ## Stop the local stack (S3 objects, models and runs stay in .state/ for the next up)
	@$(PY) scripts/stack.py down

preflight: setup ## Check sample data, Python, free ports and disk before the stack starts (make up runs it too)
	@$(PY) scripts/preflight.py

status: ## Show the services, their URLs and the Airflow login
	@$(PY) scripts/stack.py status

seed: ## Load AG News into raw/ as dated batches (plus one bad batch)
	@$(PY) -m ml.seed --bad-batch

demo: up ## The whole loop in Airflow: seed, train, serve, drift, retrain (DEMO_ARGS=--no-drift: act 1 only)
	@$(PY) scripts/demo.py $(DEMO_ARGS)

demo-quick: up ## A first look: act 1 only (train, register, serve) on 1,200 rows instead of 5,000
	@$(PY) scripts/demo.py --quick

lint: ## ruff (with the Airflow AIR rules) and format check
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .

test: setup lint ## Lint, then unit, DAG, docker/ static and integration tests (starts and stops the stack)
	@$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## Unit and DAG tests only (no services)
	@$(PY) -m pytest tests/unit tests/dags $(PYTEST_ARGS)

bench-serve: setup ## Serving benchmark: batched vs unbatched vs bare model (starts Ray; BENCH_ARGS=...)
	@$(PY) benchmarks/serve_bench.py $(BENCH_ARGS)

bench-hostile: setup ## What hostile requests cost normal clients: p50/throughput alone vs under attack (starts Ray)
	@$(PY) benchmarks/hostile_bench.py $(BENCH_ARGS)

soak: setup ## Soak benchmark: 30 min steady load on 2 replicas, RSS + p99 per minute (BENCH_ARGS=--minutes 10)
	@$(PY) benchmarks/soak.py $(BENCH_ARGS)

docker-check: setup ## Static checks of docker/: hadolint, compose spec, Kubernetes manifests, image requirements
	@$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

image-requirements: ## Regenerate docker/requirements-*.txt from the `# images:` notes in requirements.txt
	@$(PY) scripts/image_requirements.py

ui-check: ## Browser check of the Airflow UI (Playwright driving the system chromium; UI_ARGS=--dag ID ...)
	@$(PY) scripts/ui_check.py $(UI_ARGS)

clean: down ## Stop the stack and delete its state (.state/)
	rm -rf .state

.PHONY: help setup up down status seed demo demo-quick lint test test-fast bench-serve clean
.PHONY: ui-check docker-check image-requirements
.PHONY: soak bench-hostile preflight
