# The two commands of the README: `make serve` and `make test`. Each creates .venv if missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# The CPU wheel: an unpinned torch pulls the newest CUDA build (several GB).
TORCH  ?= torch==2.13.0

.PHONY: serve test lint unit integration clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,torch]"
	touch $@

serve: $(VENV)/.base
	$(VENV)/bin/mpsserve demo-model --out models/rec --format tensorflow --if-missing
	$(VENV)/bin/mpsserve serve --config deployments/local.yaml

# Two processes: Triton's gRPC client (integration) and our generated stubs (unit) register
# the same `inference` protobuf symbols, which one process cannot hold.
test: $(VENV)/.dev lint
	$(PY) -m pytest tests/unit tests/gpu
	$(PY) -m pytest tests/integration

unit: $(VENV)/.dev
	$(PY) -m pytest tests/unit tests/gpu

integration: $(VENV)/.dev
	$(PY) -m pytest tests/integration

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check mpsserve tests benchmarks
	$(VENV)/bin/ruff format --check mpsserve tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .mpsserve
