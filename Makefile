# medseg — developer entry points. Every target that runs code depends on `setup`,
# which builds .venv/ once and is a no-op afterwards (stamp file keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean docker-smoke app

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m medseg.demo --out outputs/demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check medseg app tests benchmarks

app: setup
	$(BIN)/medseg app

# Build the Dockerfile on a debootstrap'd bookworm and run the inference service in it (root; see the script).
docker-smoke: setup
	bash scripts/docker_smoke.sh

clean:
	rm -rf outputs .pytest_cache
