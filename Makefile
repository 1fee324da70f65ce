# The README's two commands: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch, installed before the package so that nothing pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# What `make lint` (and so `make test`) checks: formatting, ruff's rules and mypy (strict, pyproject.toml).
CHECKED := src tests bench deploy

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[engine,aws]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[engine,aws,postgres,ray,test]"
	touch $@

serve: $(VENV)/.installed
	$(BIN)/sdgate serve

test: lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check $(CHECKED)
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/mypy $(CHECKED)

bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[engine,aws,test,bench]"
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
