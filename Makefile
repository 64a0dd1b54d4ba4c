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

# A real Prometheus for the metrics tests (tests/integration/test_metrics_export.py). No PyPI
# package ships the server, so its binaries come from the Debian archive through `apt-get
# download` (no root, nothing installed system-wide) into the venv. Without apt, or once the
# archive has moved past this version (bump it), the step says so and those tests skip.
PROMETHEUS_DEB ?= 2.42.0+ds-5+deb12u1
PROM_TMP := $(VENV)/.prometheus-deb

$(VENV)/.prometheus: $(VENV)/.base
	@rm -rf $(PROM_TMP) && mkdir -p $(PROM_TMP)
	@if (cd $(PROM_TMP) && apt-get download -qq prometheus=$(PROMETHEUS_DEB)) >/dev/null 2>&1 \
	  && dpkg-deb -x $(PROM_TMP)/prometheus_*.deb $(PROM_TMP)/root; then \
	  cp $(PROM_TMP)/root/usr/bin/prometheus $(PROM_TMP)/root/usr/bin/promtool $(VENV)/bin/ \
	  && touch $@; \
	else echo "Prometheus $(PROMETHEUS_DEB) not installed (needs apt-get); its tests will skip"; fi
	@rm -rf $(PROM_TMP)

# A real Redis Cluster for the embedding-store tests (tests/integration/test_embeddings_store.py)
# and to carry to hosts that cannot install packages: Debian's redis-tools (its redis-check-rdb
# is the server: Debian's redis-server package only links it under that name) and the two
# libraries it needs, fetched like Prometheus above into $(VENV)/lib/redis, with wrappers in
# $(VENV)/bin that point the loader there (relative paths: bin/ and lib/redis/ can be carried
# together to a host that cannot install packages). Without apt the step says so and those
# tests skip.
REDIS_DEB ?= 5:7.0.15-1~deb12u7
REDIS_TMP := $(VENV)/.redis-deb
REDIS_LIB := $(abspath $(VENV))/lib/redis

$(VENV)/.redis: $(VENV)/.base
	@rm -rf $(REDIS_TMP) && mkdir -p $(REDIS_TMP) $(REDIS_LIB)
	@if (cd $(REDIS_TMP) && apt-get download -qq redis-tools=$(REDIS_DEB) liblzf1 libjemalloc2) \
	    >/dev/null 2>&1 && for deb in $(REDIS_TMP)/*.deb; do dpkg-deb -x $$deb $(REDIS_TMP)/root; done; then \
	  cp $(REDIS_TMP)/root/usr/bin/redis-check-rdb $(REDIS_LIB)/redis-server \
	  && cp $(REDIS_TMP)/root/usr/bin/redis-cli $(REDIS_LIB)/redis-cli \
	  && cp -L $(REDIS_TMP)/root/usr/lib/x86_64-linux-gnu/liblzf.so.1 \
	    $(REDIS_TMP)/root/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 $(REDIS_LIB)/ \
	  && for tool in redis-server redis-cli; do \
	    printf '#!/bin/sh\nlib="$$(dirname "$$0")/../lib/redis"\nLD_LIBRARY_PATH="$$lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$lib/%s" "$$@"\n' \
	      $$tool > $(VENV)/bin/$$tool && chmod +x $(VENV)/bin/$$tool; done \
	  && $(VENV)/bin/redis-server --version && touch $@; \
	else echo "redis-server $(REDIS_DEB) not installed (needs apt-get); its tests will skip"; fi
	@rm -rf $(REDIS_TMP)

serve: $(VENV)/.base
	$(VENV)/bin/mpsserve demo-model --out models/rec --format tensorflow --if-missing
	$(VENV)/bin/mpsserve serve --config deployments/local.yaml

# Two processes: Triton's gRPC client (integration) and our generated stubs (unit) register
# the same `inference` protobuf symbols, which one process cannot hold.
test: $(VENV)/.dev $(VENV)/.prometheus $(VENV)/.redis lint
	$(PY) -m pytest tests/unit tests/gpu
	MPSSERVE_PROMETHEUS_BIN=$(abspath $(VENV))/bin/prometheus \
	  MPSSERVE_REDIS_BIN=$(abspath $(VENV))/bin/redis-server $(PY) -m pytest tests/integration

unit: $(VENV)/.dev $(VENV)/.prometheus $(VENV)/.redis
	$(PY) -m pytest tests/unit tests/gpu

integration: $(VENV)/.dev $(VENV)/.prometheus $(VENV)/.redis
	MPSSERVE_PROMETHEUS_BIN=$(abspath $(VENV))/bin/prometheus \
	  MPSSERVE_REDIS_BIN=$(abspath $(VENV))/bin/redis-server $(PY) -m pytest tests/integration

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check mpsserve tests benchmarks
	$(VENV)/bin/ruff format --check mpsserve tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # [tool.importlinter] in pyproject.toml: layers, no cycles

clean:
	rm -rf $(VENV) .mpsserve
