# sslforge: the two commands a new user needs are `make quickstart` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install quickstart test test-slow bench clean

$(BIN)/sslforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/sslforge

install: $(BIN)/sslforge

# Runs the whole DAG on the built-in sample (no download): curate -> cluster -> masks -> views -> pretrain -> evaluate.
quickstart: install
	$(BIN)/sslforge run params.yaml --storage sslforge-data

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python -m bench --quick

clean:
	rm -rf sslforge-data .sslforge
