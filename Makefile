# The README's two commands: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch, installed before the package so that nothing pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The package and its extras go in with uv (10 s instead of pip's two minutes: it resolves and downloads in
# parallel). torch alone goes in with pip, which finds a wheel on this machine's disk that uv does not look
# for. --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (it is here), every process would
# otherwise compile transformers and diffusers again at each start (the suite took 14 minutes instead of 10).
# Where only pip's configuration reaches your package index: INSTALL="$(BIN)/python -m pip install".
INSTALL ?= $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode
# What `make lint` (and so `make test`) checks: formatting, ruff's rules and mypy (strict, pyproject.toml).
CHECKED := src tests bench deploy

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(INSTALL) -q -e ".[engine,aws]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(INSTALL) -q -e ".[engine,aws,postgres,ray,test]"
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
	$(INSTALL) -q -e ".[engine,aws,test,bench]"
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
