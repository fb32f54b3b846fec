# Developer loop. `make serve` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,ucx

.PHONY: install link serve test lint typecheck protos protos-check unit integration clean

# The venv, with the project installed in strict editable mode: a tree of links under build/ that mypy can follow
# (setuptools' default editable finder is invisible to static tools).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=69" wheel
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.installed

# Re-link after adding or removing a module (strict editable installs link the files present at install time).
link: install
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict 2>/dev/null

serve: link
	$(VENV)/bin/llumnix serve $(ARGS)

protos: install
	$(PY) tools/gen_protos.py

protos-check: install
	$(PY) tools/gen_protos.py --check
	cd $(CURDIR) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH buf lint && PATH=$(CURDIR)/$(VENV)/bin:$$PATH buf format -d --exit-code

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: link
	$(VENV)/bin/mypy -p pyllumnix.control_plane -p pyllumnix.data_plane -p pyllumnix.clients -p pyllumnix.tools
	$(VENV)/bin/mypy tests integration --explicit-package-bases

unit: link
	$(VENV)/bin/pytest -q tests

integration: link
	$(VENV)/bin/pytest -q integration

test: link protos-check lint typecheck
	$(VENV)/bin/pytest -q tests integration

clean:
	rm -rf build *.egg-info .mypy_cache .ruff_cache .pytest_cache
