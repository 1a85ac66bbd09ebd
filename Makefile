# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint proto bench bench-quick clean

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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
