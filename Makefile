# Fresh machine to a running demo or a passing test suite, each in one command.
# Setup is idempotent: it reinstalls only when requirements.txt or setup.py change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py setup.cfg
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned environment into $(VENV) (first time: a few minutes; log: $(VENV)/pip-install.log)"
	@$(BIN)/python -m pip install --disable-pip-version-check -r requirements.txt > $(VENV)/pip-install.log 2>&1 \
	  || { grep -v 'is ignored: it is neither' $(VENV)/pip-install.log | tail -30; echo "pip install failed; full log: $(VENV)/pip-install.log"; exit 1; }
	@$(BIN)/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e . >> $(VENV)/pip-install.log 2>&1 \
	  || { tail -30 $(VENV)/pip-install.log; exit 1; }
	@touch $@
	@echo "Environment ready."

demo: setup
	$(BIN)/cnn_rnn_perception demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/cnn_rnn_perception bench

lint: setup
	$(BIN)/python -m pytest test/test_flake8.py test/test_pep257.py

clean:
	rm -rf $(VENV) build install log *.egg-info
