# The two set-up commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The releases the tests last passed with (scripts/lock writes the file afresh);
# `make serve CONSTRAINTS=` installs the newest releases instead.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = $(BIN)/pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))

.PHONY: serve test lint lock check-python

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tandem needs Python 3.11 or newer")'

$(BIN)/python: | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Installs Tandem with the model build step, then runs it on the embedded SQLite default.
serve: $(BIN)/python
	$(PIP_INSTALL) -e '.[build]'
	$(BIN)/tandem serve

# Installs what the tests need, then runs the linters, the type checker and every test.
test: $(BIN)/python
	./scripts/ensure-system-deps
	$(PIP_INSTALL) -e '.[test]'
	$(MAKE) lint
	$(BIN)/pytest

lint:
	$(BIN)/ruff check tandem tests bench
	$(BIN)/ruff format --check tandem tests bench
	$(BIN)/mypy

# Writes constraints.txt afresh from the package index; run `make test` before committing it.
lock: | check-python
	PYTHON=$(PYTHON) ./scripts/lock
