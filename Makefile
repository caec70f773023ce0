# The two commands that set up everything on a fresh machine:
#   make demo   run one job through the whole fleet on small local models
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test soak openapi redis compose-validator prometheus-tools bench small-models clean

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The official Wan2.2 code for S2V, without the dependencies it declares (flash-attn, opencv,
	# torchvision): the fleet gives it an SDPA attention path and its own media readers.
	$(PY) -m pip install --quiet --no-deps wan22==2.2.11
	# SAM2 for Animate's preprocessing, without its declared torchvision (a build for another
	# torch breaks diffusers' imports) and, on machines without CUDA, without its CUDA kernel.
	SAM2_BUILD_CUDA=$${SAM2_BUILD_CUDA:-0} $(PY) -m pip install --quiet --no-deps sam2==1.1.0
	touch $(STAMP)

redis:
	scripts/ensure-redis

# docker-compose 1.29 validates the compose file without an engine (tests/unit/test_deploy.py).
compose-validator:
	@command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }

# Prometheus and promtool run the alerting rules of deploy/prometheus (tests/integration/test_alert_rules.py).
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

small-models: $(STAMP)
	$(PY) -m testkit.small_models --out var/small-models

demo: $(STAMP) redis
	$(PY) scripts/demo.py

# Lint and format check first: a style error fails in seconds, before the suite's minutes.
test: $(STAMP) redis compose-validator prometheus-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Bytecode is cached even where the environment sets PYTHONDONTWRITEBYTECODE: else every
	# process compiles the project's modules again (each fleet worker and API a test starts, each
	# group rank) and pytest rewrites every plugin's asserts again in each of its processes.
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest

# The API's OpenAPI document, saved for the TypeScript client (a test keeps it current).
openapi: $(STAMP)
	$(PY) -c "import json, producer.api as api; print(json.dumps(api.openapi_document(), indent=2, ensure_ascii=False))" > clients/typescript/openapi.json

# 500 jobs across two workers while one is killed -9 every few seconds; prints the ledger.
soak: $(STAMP) redis
	$(PY) -m tests.faults.soak --jobs 500

bench: $(STAMP) redis
	$(PY) bench/enqueue.py
	$(PY) bench/overhead.py
	$(PY) bench/models.py
	$(PY) bench/fleet_sim.py
	$(PY) bench/sse.py

clean:
	rm -rf var .pytest_cache
