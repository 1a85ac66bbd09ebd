# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint proto bench bench-quick bench-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $@

setup: $(STAMP)

## run: start mc-proxy on loopback with demo backends and print commands to try
run: $(STAMP)
	$(BIN)/mc-proxy demo

## test: the whole suite (unit and end-to-end)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check mcproxy tests bench
	$(BIN)/ruff format --check mcproxy tests bench
	$(BIN)/mypy

## proto: regenerate mcproxy/admin/v1 from proto/mc_proxy/v1/admin.proto
proto: $(STAMP)
	$(BIN)/python -m mcproxy.admin.protogen

## bench: mc-proxy next to HAProxy on loopback, 1 and 2 workers, medians of 3 runs (~15 min)
##   BENCH_ARGS="--workers 1 --proxy-cpus 0 --load-cpus 1 --only l4_bulk,l4_connrate"
bench: $(STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

## bench-quick: the same code path with tiny sizes (a minute or less)
bench-quick: $(STAMP) bench-tools
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

BENCH_PACKAGES := haproxy nghttp2-client wrk openssl
bench-tools:
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
